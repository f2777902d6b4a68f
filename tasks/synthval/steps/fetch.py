"""`synthval fetch`: bring a dataset or a model into a folder, once, whole, and verified.

The machinery is `synthval.io.sources`; this step adds the `generate://` source, procedural demo data
drawn on the spot, so every recipe's fetch works with no network.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from synthval.demo.generator import generate_dataset
from synthval.errors import FetchError
from synthval.io import storage
from synthval.io.archives import DEFAULT_MAX_MEMBERS
from synthval.io.sources import fetch_source


def run_fetch(source: str, out_uri: str, checksum: str | None = None, extract: bool = True,
              max_extract_bytes: int = 64 * 2**30, retries: int = 5, usim_token: str | None = None, *,
              retry_delay: float | None = None, max_extract_members: int = DEFAULT_MAX_MEMBERS,
              usim_api: str | None = None) -> dict[str, Any]:
    """Fetch `source` into the folder `out_uri`; return {"dataset_uri", "files", "cached"[, "file_uri"]}.

    `source` is `generate://...` (see `_generate_source`) or anything `synthval.io.sources.fetch_source`
    accepts: an http(s):// URL, gs:// object or prefix, local path, usim://PROJECT/RUN or a named source.
    """
    if storage.scheme_of(source) == "generate":
        return _generate_source(source, out_uri)
    return fetch_source(source, out_uri, checksum=checksum, extract=extract, max_extract_bytes=max_extract_bytes,
                        retries=retries, usim_token=usim_token, retry_delay=retry_delay,
                        max_extract_members=max_extract_members, usim_api=usim_api)


GENERATE_PARAMS = {"num_images": int, "image_size": int, "seed": int, "format": str}


def _generate_source(source: str, out_uri: str) -> dict[str, Any]:
    """`generate://KIND?num_images=N&image_size=S&seed=K&format=F`: make procedural demo data.

    Lets every recipe's fetch step, and so its default params, work with no network (the embedded
    default and CI): the data are drawn by `synthval.demo.generator`, NOT real images.
    """
    parts = urllib.parse.urlsplit(source)
    kind = parts.netloc
    options: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key not in GENERATE_PARAMS:
            raise FetchError(f"{source}: unknown parameter {key!r}; accepted: {', '.join(GENERATE_PARAMS)}")
        try:
            options[key] = GENERATE_PARAMS[key](value)
        except ValueError as exc:
            raise FetchError(f"{source}: parameter {key}={value!r} is not a whole number") from exc
    if "num_images" not in options:
        raise FetchError(f"{source}: num_images is required, e.g. generate://synthetic?num_images=400")
    result = generate_dataset(kind=kind, out_uri=out_uri, num_images=options["num_images"],
                              image_size=options.get("image_size", 256), seed=options.get("seed", 0),
                              layout=options.get("format", "perception"))
    return {"dataset_uri": result["dataset_uri"], "files": result["num_images"], "cached": False}

