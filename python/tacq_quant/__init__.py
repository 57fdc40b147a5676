"""tacq_quant: turns a Hugging Face causal LM into a TACQ, CLAQ, GPTQ or RTN checkpoint (format v1)."""

__version__ = "0.1.0"
