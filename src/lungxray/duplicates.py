"""Duplicate search: which images of a scan are copies (identical pixels) or near-copies of one
another, as clusters.

Holds ``find_duplicate_groups`` and the search for perceptual-hash pairs within a few bits, which
compares only the pairs that can be that close (multi-index hashing) rather than every image
with every other, and checks their thumbnails a batch at a time: memory grows with the images and
the close pairs, not with the square of the images. Decoding and hashing are the scan's
(``data.py``); this module reads pixels only.
"""

from __future__ import annotations

import mmap
from itertools import combinations

import numpy as np
from PIL import Image

PIECES = 4  # the 64-bit hash cut in 4 pieces of 16 bits, each a key of its own index
PIECE_BITS = 64 // PIECES
# Above this many bits of difference allowed per piece (near_duplicate_distance 16 and more), the
# index enumerates thousands of piece values per image: comparing every pair, a block at a time,
# is faster, and at such distances most pairs are candidates anyway.
MOST_BITS_PER_PIECE = 3
BATCH = 1 << 18  # hash pairs compared at a time (a few int64 arrays of this length)
PAIR_BATCH = 4096  # thumbnail pairs correlated at a time (two (PAIR_BATCH, 1024) float32 arrays, 32 MB)
THUMBNAIL_BATCH = 4096  # images read and shrunk at a time


def find_duplicate_groups(
    images: np.ndarray, pixel_hashes: list[str], phashes: list[str], max_distance: int, min_correlation: float
) -> np.ndarray:
    """Cluster id per image: identical pixels, or near-copies.

    A near-copy pair has perceptual hashes within ``max_distance`` bits *and* 32x32 thumbnails
    correlated at ``min_correlation`` or more: on chest X-rays the perceptual hash alone pairs
    different patients (radiographs look alike at 8x8 DCT resolution), the correlation check
    removes those. Clusters are connected components, so a chain of near-copies is one group;
    their ids are numbered in the order of each cluster's first image. ``images`` (N, H, W) may be
    memory-mapped: only images in a candidate pair are read, a batch at a time.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(pixel_hashes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    hashes = np.array([int(h, 16) for h in phashes], dtype=np.uint64)  # (N,)
    rows, cols = close_pairs(hashes, max_distance)
    if len(rows):
        involved, position = np.unique(np.concatenate([rows, cols]), return_inverse=True)
        thumbs = _thumbnails(images, involved)  # only images in a candidate pair
        a, b = position[: len(rows)], position[len(rows) :]
        keep = np.concatenate([
            np.einsum("ij,ij->i", thumbs[a[s : s + PAIR_BATCH]], thumbs[b[s : s + PAIR_BATCH]]) / thumbs.shape[1]
            >= min_correlation
            for s in range(0, len(a), PAIR_BATCH)
        ])  # fmt: skip
        rows, cols = rows[keep], cols[keep]
    # identical pixels: link every image to the first one with the same hash
    _, first, inverse = np.unique(pixel_hashes, return_index=True, return_inverse=True)
    rows, cols = np.concatenate([rows, np.arange(n)]), np.concatenate([cols, first[inverse]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def close_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64: every pair i < j of ``hashes`` (N,) uint64 whose Hamming distance is
    ``max_distance`` or less, in row-major order.

    Two hashes within d bits differ in at most d // 4 bits in one of their four 16-bit pieces
    (pigeonhole), so for each piece only the images whose piece lies within d // 4 bits of
    another's are compared: for 100,000 random hashes and d = 10, about 40 million pairs in place
    of 5 billion."""
    n = len(hashes)
    per_piece = max_distance // PIECES
    if per_piece < 0 or n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    found = (
        _all_pairs(hashes, max_distance) if per_piece > MOST_BITS_PER_PIECE else _indexed_pairs(hashes, max_distance)
    )
    keys = np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)  # i * N + j, sorted
    return keys // n, keys % n


def _within(hashes: np.ndarray, i: np.ndarray, j: np.ndarray, max_distance: int) -> np.ndarray:
    """i * N + j for the pairs (i, j) within ``max_distance`` bits."""
    close = np.bitwise_count(hashes[i] ^ hashes[j]) <= max_distance
    return i[close] * len(hashes) + j[close]


def _all_pairs(hashes: np.ndarray, max_distance: int) -> list[np.ndarray]:
    """Every pair compared, a block of rows at a time: (block, N) distances, never (N, N)."""
    n, found = len(hashes), []
    step = max(1, BATCH // n)
    for start in range(0, n, step):
        block = np.bitwise_count(hashes[start : start + step, None] ^ hashes[None, :])  # (step, N)
        i, j = np.nonzero(np.triu(block <= max_distance, k=start + 1))
        found.append((i + start) * n + j)
    return found


def _indexed_pairs(hashes: np.ndarray, max_distance: int) -> list[np.ndarray]:
    """The pairs within ``max_distance`` bits, found piece by piece: each piece's images sorted by
    its value, and each value's images compared with those of every value within ``max_distance //
    PIECES`` bits of it (a pair may be found in several pieces; the caller keeps one)."""
    per_piece = max_distance // PIECES
    masks = [0] + [sum(1 << b for b in bits) for k in range(1, per_piece + 1)
                   for bits in combinations(range(PIECE_BITS), k)]  # fmt: skip
    found = []
    for piece in range(PIECES):
        key = ((hashes >> np.uint64(piece * PIECE_BITS)) & np.uint64((1 << PIECE_BITS) - 1)).astype(np.int64)
        order = np.argsort(key, kind="stable")  # images by piece value
        values, starts, sizes = np.unique(key[order], return_index=True, return_counts=True)
        bucket = np.full(1 << PIECE_BITS, -1, dtype=np.int64)
        bucket[values] = np.arange(len(values))
        for mask in masks:
            other = bucket[values ^ mask]
            # each pair of values once: a value with itself, or with a larger one
            mine = np.flatnonzero((other >= 0) & (values <= (values ^ mask)))
            found += _compare(hashes, order, (starts[mine], sizes[mine]), (starts[other[mine]], sizes[other[mine]]),
                              max_distance)  # fmt: skip
    return found


def _compare(hashes: np.ndarray, order: np.ndarray, left: tuple, right: tuple, max_distance: int) -> list[np.ndarray]:
    """Every image of each ``left`` run of ``order`` (starts, sizes) against every image of the
    matching ``right`` run, a batch of pairs at a time: the pairs i < j within ``max_distance``."""
    # one row per image of a left run: (its position in order, where its right run starts, its size)
    row_sizes = np.repeat(right[1], left[1])
    row_of = np.repeat(left[0] - np.concatenate([[0], np.cumsum(left[1])[:-1]]), left[1]) + np.arange(left[1].sum())
    row_start = np.repeat(right[0], left[1])
    ends = np.cumsum(row_sizes)
    found, first = [], 0
    while first < len(row_sizes):
        last = max(int(np.searchsorted(ends, ends[first] - row_sizes[first] + BATCH, side="right")), first + 1)
        sizes = row_sizes[first:last]
        pair_row = np.repeat(np.arange(first, last), sizes)
        offset = np.arange(len(pair_row)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        i, j = order[row_of[pair_row]], order[row_start[pair_row] + offset]
        i, j = np.minimum(i, j), np.maximum(i, j)
        distinct = i < j  # a value's own run pairs each image with itself and each pair twice
        found.append(_within(hashes, i[distinct], j[distinct], max_distance))
        first = last
    return found


def _thumbnails(images: np.ndarray, which: np.ndarray) -> np.ndarray:
    """(len(which), 1024) float32: standardised 32x32 box-filtered thumbnails of ``images[which]``
    ((N, H, W) uint8), read ``THUMBNAIL_BATCH`` images at a time. A read-only memory map's pages
    are let go after each batch: they stay in the page cache, not in this process's memory (the
    stack of 100,000 images at 224 px is 5 GB)."""
    mapped = isinstance(images.base, mmap.mmap) and not images.flags.writeable and hasattr(mmap, "MADV_DONTNEED")
    out = np.empty((len(which), 32 * 32), dtype=np.float32)
    for start in range(0, len(which), THUMBNAIL_BATCH):
        batch = np.asarray(images[which[start : start + THUMBNAIL_BATCH]])
        if mapped:
            images.base.madvise(mmap.MADV_DONTNEED)
        thumbs = np.stack([
            np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BOX), dtype=np.float32).ravel()
            for im in batch
        ])  # fmt: skip
        thumbs -= thumbs.mean(axis=1, keepdims=True)
        out[start : start + len(batch)] = thumbs / np.maximum(thumbs.std(axis=1, keepdims=True), 1e-6)
    return out
