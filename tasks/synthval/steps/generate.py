"""`synthval generate`: a procedural demo dataset (NOT real data) at a URI, for the demo, CI and tests.

The generator itself is `synthval.demo.generator`; the fetch step uses it too, for `generate://` sources.
"""

from __future__ import annotations

from synthval.demo.generator import generate_dataset


def run_generate(kind: str, out_uri: str, num_images: int, image_size: int = 256, seed: int = 0,
                 layout: str = "perception") -> dict:
    """Write the dataset at `out_uri` (once: a finished one is found and kept); return its XCom result."""
    return generate_dataset(kind=kind, out_uri=out_uri, num_images=num_images, image_size=image_size, seed=seed,
                            layout=layout)
