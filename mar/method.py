"""The MAR record of the method registry (see common/registry.py): the KL-16 VAE and the MAR prior."""
from __future__ import annotations

from common.registry import Method, OfficialFormats, PriorType, TokenizerType
from mar import official
from mar.model import MAR
from mar.stage1 import STAGE1_SCHEMA, KLVAEStage1Task
from mar.stage2 import MAR_SCHEMA, MARStage2Task, check_tokenizer, prepare, sampling_defaults
from mar.vae import KLVAE

METHOD = Method(
    name="mar",
    tokenizers=(TokenizerType("kl-vae", KLVAE.from_config, STAGE1_SCHEMA, KLVAEStage1Task),),
    priors=(PriorType("mar", MAR, MAR.from_config, MAR_SCHEMA, MARStage2Task, prepare, check_tokenizer,
                      sampling_defaults),),
    official=OfficialFormats(tokenizer=official.official_tokenizer, prior=official.official_prior,
                             prior_weights=official.official_prior_weights),
)
