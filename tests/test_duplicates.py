"""The duplicate search: the same groups as comparing every image with every other, without its
N x N memory."""

from __future__ import annotations

import hashlib
import time
import tracemalloc

import numpy as np
import pytest
from conftest import synthetic_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lungxray import duplicates
from lungxray.data import perceptual_hash
from lungxray.duplicates import close_pairs, find_duplicate_groups


def _reference_thumbnails(images: np.ndarray) -> np.ndarray:
    """The all-pairs search as it was written first: the reference the index must agree with."""
    thumbs = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BOX), dtype=np.float32).ravel()
            for im in images
        ]
    )
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    return thumbs / np.maximum(thumbs.std(axis=1, keepdims=True), 1e-6)


def reference_groups(
    images: np.ndarray, pixel_hashes: list[str], phashes: list[str], max_distance: int, min_correlation: float
) -> np.ndarray:
    """Every pair's Hamming distance in one (N, N) matrix, then the thumbnails' correlation."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(pixel_hashes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(
        np.frombuffer(b"".join(bytes.fromhex(h) for h in phashes), dtype=np.uint8).reshape(n, 8), axis=1
    ).astype(np.int16)  # (N, 64)
    distance = bits @ (1 - bits).T + (1 - bits) @ bits.T  # (N, N) Hamming distances
    rows, cols = np.nonzero(np.triu(distance <= max_distance, k=1))
    if len(rows):
        involved, position = np.unique(np.concatenate([rows, cols]), return_inverse=True)
        thumbs = _reference_thumbnails(images[involved])
        a, b = position[: len(rows)], position[len(rows) :]
        corr = np.einsum("ij,ij->i", thumbs[a], thumbs[b]) / thumbs.shape[1]
        rows, cols = rows[corr >= min_correlation], cols[corr >= min_correlation]
    _, first, inverse = np.unique(pixel_hashes, return_index=True, return_inverse=True)
    rows, cols = np.concatenate([rows, np.arange(n)]), np.concatenate([cols, first[inverse]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _flip(phash: str, bits: np.ndarray) -> str:
    value = int(phash, 16)
    for bit in bits:
        value ^= 1 << int(bit)
    return f"{value:016x}"


def scan_like(seed: int, size: int = 24) -> tuple[np.ndarray, list[str], list[str]]:
    """(images (N, size, size), pixel hashes, perceptual hashes) of a made-up scan: distinct films,
    near copies (noise, a shift of 1-2 px, brighter), exact copies, films given another's hash
    (collisions) and hashes a chosen number of bits away from another's (0-14: both sides of every
    distance asked)."""
    rng = np.random.default_rng(seed)
    images, phashes = [], []
    for i in range(int(rng.integers(1, 60))):
        images.append(synthetic_image(int(rng.integers(3)), int(rng.integers(1000)) + 1000 * i, size))
        phashes.append(perceptual_hash(images[-1]))
        for _ in range(int(rng.integers(0, 3))):
            kind, base = rng.integers(5), images[-1].astype(np.int16)
            if kind == 0:  # grain
                copy = base + rng.normal(0, rng.uniform(1, 25), base.shape)
            elif kind == 1:  # shifted
                copy = np.roll(base, int(rng.integers(1, 3)), axis=int(rng.integers(2)))
            elif kind == 2:  # exposed differently
                copy = base + rng.integers(5, 40)
            else:  # byte for byte
                copy = base
            images.append(np.clip(copy, 0, 255).astype(np.uint8))
            phashes.append(perceptual_hash(images[-1]) if kind < 4 else phashes[-1])
    n = len(images)
    for _ in range(int(rng.integers(0, n // 2 + 1))):  # hashes planted near another's
        i, j = rng.integers(n, size=2)
        phashes[j] = _flip(phashes[i], rng.choice(64, int(rng.integers(0, 15)), replace=False))
    stack = np.stack(images)
    pixel_hashes = [hashlib.blake2b(im.tobytes(), digest_size=16).hexdigest() for im in stack]
    return stack, pixel_hashes, phashes


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    max_distance=st.sampled_from([0, 1, 3, 4, 8, 10, 11, 12, 15, 16, 20, 32]),
    min_correlation=st.sampled_from([-1.0, 0.5, 0.9, 0.95, 0.99, 1.0, None]),
)
def test_the_groups_are_those_of_comparing_every_pair(seed, max_distance, min_correlation):
    """Same cluster ids, in the same order, as the all-pairs search, for near copies, exact copies,
    hash collisions and hashes planted on both sides of the distance, and a correlation threshold
    equal to a pair's correlation (None); pairs and thumbnails taken a few at a time, so that
    batches split them."""
    images, pixel_hashes, phashes = scan_like(seed)
    if min_correlation is None:  # a tie: the correlation of the last image and its nearest hash's
        distance = [bin(int(h, 16) ^ int(phashes[-1], 16)).count("1") for h in phashes[:-1]] or [0]
        pair = _reference_thumbnails(images[[int(np.argmin(distance)), -1]])
        min_correlation = float(pair[0] @ pair[1] / pair.shape[1])
    expected = reference_groups(images, pixel_hashes, phashes, max_distance, min_correlation)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(duplicates, "BATCH", 7)
        patch.setattr(duplicates, "PAIR_BATCH", 3)
        patch.setattr(duplicates, "THUMBNAIL_BATCH", 5)
        found = find_duplicate_groups(images, pixel_hashes, phashes, max_distance, min_correlation)
    assert found.dtype == np.int64 and found.tolist() == expected.tolist()


@pytest.mark.parametrize("seed", range(6))
def test_the_index_finds_every_close_hash_pair(seed):
    """``close_pairs`` against every pair's distance, for hashes crowded into a few values of each
    16-bit piece (large buckets), at every distance the settings allow (the index up to 15 bits,
    comparing every pair beyond)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    centres = rng.integers(0, 2**64 - 1, 5, dtype=np.uint64, endpoint=True)
    hashes = centres[rng.integers(5, size=n)]
    for i in range(n):  # a few bits away from a centre
        for bit in rng.choice(64, int(rng.integers(0, 20)), replace=False):
            hashes[i] ^= np.uint64(1 << int(bit))
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for max_distance in range(33):
        rows, cols = np.nonzero(np.triu(distance <= max_distance, k=1))
        found = close_pairs(hashes, max_distance)
        assert found[0].tolist() == rows.tolist() and found[1].tolist() == cols.tolist(), max_distance


def test_twenty_thousand_hashes_take_a_fraction_of_the_all_pairs_memory():
    """20,000 images (random hashes, 100 near-copy pairs and 50 hash collisions of unlike films):
    the near copies are grouped, the collisions not, in seconds and without an (N, N) array: the
    all-pairs search's distance matrix alone is N * N * 2 bytes (800 MB)."""
    n = 20_000
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    for k in range(100):  # image 2k + 1 a near copy of image 2k: hash within 10 bits, same pixels but one
        hashes[2 * k + 1] = hashes[2 * k] ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, k % 11, replace=False)))
        images[2 * k + 1] = images[2 * k]
        images[2 * k + 1, 0, 0] ^= 1
    for k in range(50):  # image 1000 + k shares the hash of image 2000 + k, not its look
        hashes[1000 + k] = hashes[2000 + k]
    phashes = [f"{int(h):016x}" for h in hashes]
    pixel_hashes = [str(i) for i in range(n)]
    tracemalloc.start()
    start = time.perf_counter()
    groups = find_duplicate_groups(images, pixel_hashes, phashes, 10, 0.95)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert all(groups[2 * k] == groups[2 * k + 1] for k in range(100))
    assert len(np.unique(groups)) == n - 100  # the 100 pairs, nothing else
    assert peak < n * n * 2 / 20, f"{peak / 1e6:.0f} MB"
    assert seconds < 20, seconds  # about 0.5 s alone on one core; the all-pairs search about 10 s
