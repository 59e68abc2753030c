"""Optional GPU kernels (Triton). Nothing here is imported unless a CUDA tensor asks for it:
``trl_regularizers.core.full_kl`` loads ``full_kl_triton`` lazily on first CUDA use."""
