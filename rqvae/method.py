"""The RQ-VAE + RQ-Transformer record of the method registry (see common/registry.py)."""
from __future__ import annotations

from common.registry import Method, OfficialFormats, PriorType, TokenizerType
from rqvae import official, stage2
from rqvae.stage1 import STAGE1_SCHEMA, RQVAEStage1Task
from rqvae.transformer import RQTransformer
from rqvae.vqvae import RQVAE

METHOD = Method(
    name="rqvae",
    tokenizers=(TokenizerType("rq-vae", RQVAE.from_config, STAGE1_SCHEMA, RQVAEStage1Task),),
    priors=(PriorType("rq-transformer", RQTransformer, RQTransformer.from_config, stage2.STAGE2_SCHEMA,
                      stage2.RQTransformerStage2Task, stage2.prepare, stage2.check_tokenizer,
                      stage2.sampling_defaults),),
    official=OfficialFormats(tokenizer=official.official_tokenizer,
                             tokenizer_weights=official.official_tokenizer_weights,
                             prior=official.official_prior, prior_weights=official.official_prior_weights),
)
