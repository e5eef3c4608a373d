"""Top-1 of the zoo's ImageNet classifiers on two scikit-image photos (`chelsea`, a cat, and
`coffee`, a cup of espresso): the figures of the README's "Verified numerically" table.

  python -m benchmarks.zoo_photos
"""

from __future__ import annotations

import os
import tempfile

from tljax.predict import Predictor, predict
from tljax.weights import zoo


def main() -> None:
  from PIL import Image
  from skimage import data
  with tempfile.TemporaryDirectory() as folder:
    paths = [os.path.join(folder, 'chelsea.png'), os.path.join(folder, 'coffee.jpg')]
    Image.fromarray(data.chelsea()).save(paths[0])
    Image.fromarray(data.coffee()).save(paths[1], quality=95)  # as tests/test_weights.py
    for name, entry in zoo.ZOO.items():
      if entry.labels != 'imagenet' or not entry.where.startswith('package:'):
        continue
      cat, coffee = predict(Predictor.from_zoo(name), paths, top_k=1)
      print(f'{name}: chelsea {cat[0][0]} {cat[0][1]:.1%}; coffee {coffee[0][0]} '
            f'{coffee[0][1]:.1%}')


if __name__ == '__main__':
  main()
