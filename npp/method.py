"""The LlamaGen VQ-16 + GPT (next-patch prediction) record of the method registry (see common/registry.py)."""
from __future__ import annotations

from common.registry import Method, OfficialFormats, PriorType, TokenizerType
from npp import official, stage2
from npp.gpt import GPT
from npp.stage1 import STAGE1_SCHEMA, VQStage1Task
from npp.vq import VQTokenizer

METHOD = Method(
    name="npp",
    tokenizers=(TokenizerType("vq16", VQTokenizer.from_config, STAGE1_SCHEMA, VQStage1Task),),
    priors=(PriorType("llamagen-gpt", GPT, GPT.from_config, stage2.NPP_SCHEMA, stage2.NPPStage2Task, stage2.prepare,
                      stage2.check_tokenizer, stage2.sampling_defaults),),
    official=OfficialFormats(tokenizer=official.official_tokenizer,
                             tokenizer_weights=official.official_tokenizer_weights,
                             prior=official.official_prior, prior_weights=official.official_prior_weights),
)
