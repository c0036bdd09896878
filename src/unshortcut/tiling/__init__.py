"""From whole images to patches: tissue detection, the patch grid, per-patch labels."""
