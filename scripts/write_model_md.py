"""Write MODEL.md for a shipped base model directory from its model card (run once)."""

import json
import sys
from pathlib import Path

model = Path(sys.argv[1])
commands = Path(sys.argv[2]).read_text().strip()
card = json.loads((model / "model_card.json").read_text())
metrics = card.get("metrics", {})
text = f"""# {model.name}: the publicly pretrained base LDM shipped with dpfl

Trained with dpfl's own command on the **public** split of Fashion-MNIST only
(`fmnist:public`: half of the training images of classes 0-4, {card['examples']} images, seed 0).
It has never seen classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) nor any private image:
its samples for those classes show what the public model guesses, and federated DP fine-tuning
is what teaches them.

- Architecture: preset `{card['preset']}`; diffusers `AutoencoderKL` ({card['vae_parameters']:,}
  parameters, 32x32 -> 4x8x8 latents, per-channel latent normalisation in the VAE config) and a
  class-conditional `UNet2DModel` ({card['unet_parameters']:,} parameters, attention at 4x4 and
  2x2, 11 class embeddings: 10 classes + the null class for classifier-free guidance), DDPM
  scheduler (1000 steps, cosine betas, v-prediction). Weights: safetensors, float32.
- Training: autoencoder {card['ae_steps']} steps, UNet {card['unet_steps']} steps (EMA), batch 96,
  on a 2-core CPU. Final autoencoder L1 {metrics.get('ae_rec_l1')}, UNet loss (running)
  {metrics.get('unet_loss_ema')}.
- Fingerprint (recomputed on load, announced by the coordinator, verified by every site):
  `{card['fingerprint']}`
- Data licence: Fashion-MNIST is MIT-licensed (Zalando Research); the images come from Debian's
  package `dataset-fashion-mnist`.

## Exact command

{commands}

`samples.png` beside this file is the sample grid the run wrote (one row per class).
"""
(model / "MODEL.md").write_text(text)
print(text)
