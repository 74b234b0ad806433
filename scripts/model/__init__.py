"""The model: plain ``nn.Module`` networks (reconstructor R, PatchGAN critic D), their losses, the adversarial trainer."""
