"""Small synthetic formula-like images."""
import numpy as np


def strokes(height, width, seed=0, light_on_dark=True):
    """A uint8 image: a few bright strokes on black (CoMER's look), or the inverse."""
    rng = np.random.RandomState(seed)
    image = np.zeros((height, width), np.uint8)
    for _ in range(4):
        r, c = rng.randint(0, height), rng.randint(0, width)
        image[r : r + max(1, height // 4), c : c + max(2, width // 6)] = 255
    return image if light_on_dark else 255 - image
