"""Open-MAGVIT2 tokenizer: MAGVIT-2 style encoder/decoder around a lookup-free quantizer (Luo et al., 2024)."""
