"""Document cleaning: normalized-text hashes (exact dedup), MinHash LSH (near dedup), PII scrubbing, split.

Everything here is deterministic and independent of process layout: a document's hash, signature and
split depend only on its text and the seed.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
PHONE_RE = re.compile(
    r"(?<![\w+])(?:"
    r"\+?\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})[ .-]\d{3,4}[ .-]\d{3,4}"  # +1 555 123 4567, +86 10 1234 5678
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{3,4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3,4}[.-]\d{4}"  # 555-123-4567, 020-1234-5678
    r"|1[3-9]\d{9}"  # mainland China mobile
    r")(?![\w])"
)
EMAIL_TOKEN, PHONE_TOKEN = "[EMAIL]", "[PHONE]"


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed: two documents differing only in these are duplicates."""
    return " ".join(text.lower().split())


def text_key(norm: str) -> int:
    """64-bit blake2b of the normalized text."""
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def is_val(key: int, seed: int, val_fraction: float) -> bool:
    """Document-level split from (seed, text hash): the same document lands in the same split every run."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(seed.to_bytes(8, "little", signed=True) + key.to_bytes(8, "little"), digest_size=8)
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0**64


def scrub_pii(text: str) -> tuple[str, int, int]:
    """Replace e-mail addresses and phone numbers; returns (text, n_emails, n_phones)."""
    text, n_email = EMAIL_RE.subn(EMAIL_TOKEN, text)
    text, n_phone = PHONE_RE.subn(PHONE_TOKEN, text)
    return text, n_email, n_phone


class MinHasher:
    """MinHash over character n-grams of the normalized text (language-agnostic: works for Chinese).

    Hash functions are multiply-shift over 64-bit n-gram hashes; ``num_perm`` = ``bands`` × ``rows``.
    """

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = (rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1))[:, None]
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)[:, None]

    def shingles(self, norm: str) -> np.ndarray:
        cps = np.frombuffer(norm.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
        n = self.ngram
        if len(cps) < n:
            n = max(len(cps), 1)
            if len(cps) == 0:
                cps = np.zeros(1, dtype=np.uint64)
        m = len(cps) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = h * np.uint64(0x100000001B3) + cps[k:k + m] + np.uint64(1)
            # splitmix64 finalizer: spread the polynomial hash over all 64 bits
            h ^= h >> np.uint64(30)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(27)
            h *= np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
        return np.unique(h)

    def signature(self, norm: str) -> np.ndarray:
        sh = self.shingles(norm)
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), 4096):
                chunk = sh[i:i + 4096][None, :]
                v = ((self.a * chunk + self.b) >> np.uint64(32)).astype(np.uint32)
                np.minimum(sig, v.min(axis=1), out=sig)
        return sig


class NearDedup:
    """LSH index over kept signatures; a candidate counts as a duplicate when the estimated Jaccard
    similarity (share of equal signature slots) reaches ``threshold``."""

    def __init__(self, num_perm: int = 128, bands: int = 16, threshold: float = 0.8):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.bands, self.rows, self.threshold = bands, num_perm // bands, threshold
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.sigs: list[np.ndarray] = []

    def seen(self, sig: np.ndarray) -> bool:
        """True when ``sig`` is a near duplicate of a kept document; otherwise index it and return False."""
        keys = [sig[b * self.rows:(b + 1) * self.rows].tobytes() for b in range(self.bands)]
        checked: set[int] = set()
        for table, key in zip(self.tables, keys):
            for j in table.get(key, ()):
                if j in checked:
                    continue
                checked.add(j)
                if float(np.mean(self.sigs[j] == sig)) >= self.threshold:
                    return True
        idx = len(self.sigs)
        self.sigs.append(sig)
        for table, key in zip(self.tables, keys):
            table.setdefault(key, []).append(idx)
        return False
