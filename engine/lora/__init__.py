"""LoRA adapters: PEFT folders read into batched, slot-based LoRA layers wrapped around a built model."""
