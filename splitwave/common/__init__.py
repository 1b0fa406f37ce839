"""The torch-free layer every side shares: config schema, data, tokenizer, LoRA naming, paths."""
