"""The Open-MAGVIT2 record of the method registry (see common/registry.py)."""
from __future__ import annotations

from common.registry import Method, OfficialFormats, TokenizerType
from lfq import official
from lfq.model import LFQTokenizer
from lfq.stage1 import STAGE1_SCHEMA, LFQStage1Task

METHOD = Method(
    name="lfq",
    tokenizers=(TokenizerType("lfq", LFQTokenizer.from_config, STAGE1_SCHEMA, LFQStage1Task),),
    official=OfficialFormats(stage1_config=official.official_stage1_config, tokenizer=official.official_tokenizer,
                             tokenizer_weights=official.official_tokenizer_weights),
)
