"""Two-stage self-distillation: the student (PEFT LoRA), data, losses, checkpoints and the loop."""
