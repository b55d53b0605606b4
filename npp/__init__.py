"""Next Patch Prediction on LlamaGen (Pang et al., 2024): the LlamaGen VQ-16 tokenizer so far."""
