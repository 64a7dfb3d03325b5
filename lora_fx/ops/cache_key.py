"""torch.compile's on-disk caches, keyed on lora_fx's ops as they are.

Inductor's FX graph cache keys compiled code on the graph, which names a custom op (`lora_fx::dropout_linear`) but
does not hold its Python implementation or fake kernel: after an upgrade that changes what an op returns, a warm
cache serves code compiled for the old op (seen here: stride assertions failing on the new outputs). lora_fx
therefore adds a tag to torch.compile's cache key (`torch.compiler.config.cache_key_tag`, which torch provides to
break caches) naming a digest of its ops' source files: code compiled with other lora_fx ops is never reused. A tag
the user set stays in the key, with this one after it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

TAG_PREFIX = "lora_fx-ops-"


def ops_digest() -> str:
    """A digest of the source of every file defining lora_fx's custom ops."""
    sources = sorted(Path(__file__).parent.glob("*.py"))
    return hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]


def tag_compile_caches() -> str:
    """Put this lora_fx's ops digest into torch.compile's cache key; returns the whole tag."""
    tag = TAG_PREFIX + ops_digest()
    current = torch.compiler.config.cache_key_tag
    kept = "+".join(part for part in current.split("+") if part and not part.startswith(TAG_PREFIX))
    torch.compiler.config.cache_key_tag = f"{kept}+{tag}" if kept else tag
    return torch.compiler.config.cache_key_tag
