"""The models themselves: config, layers, RoPE, MemoryLLM, M+, decoding. Pure torch: no files, no names."""
