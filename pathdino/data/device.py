"""Tiles of a GPU-path batch on the training device: uploaded decoded pixels, or JPEG bytes decoded there."""

from __future__ import annotations

import warnings

import torch

from pathdino.data.worker import RawBatch


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work, and the warning
        # (one per call) is nothing for the user to act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # one corrupt tile fails the batched call: find it one by one
        out: list[torch.Tensor | Exception] = []
        for d in data:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                out.append(exc)
        return out


def device_tiles(raw: RawBatch, device: torch.device, store_urls: tuple[str, ...]) -> torch.Tensor:
    """Float tiles [B, 3, H, W] in [0, 1] on ``device``; tiles that fail to decode here are replaced by another
    tile of the batch and recorded in ``raw.failures``."""
    if raw.tiles_u8 is not None:
        hwc = raw.tiles_u8.to(device, non_blocking=True)
        return hwc.permute(0, 3, 1, 2).contiguous().float().div_(255)
    assert raw.encoded is not None and raw.encoded_lengths is not None and raw.params is not None
    pieces = torch.split(raw.encoded, [n for n in raw.encoded_lengths if n])
    jpeg_at = [i for i, n in enumerate(raw.encoded_lengths) if n]
    decoded = dict(zip(jpeg_at, _decode_jpegs(list(pieces), device)))
    size = (int(raw.params[0].height.max()), int(raw.params[0].width.max()))  # boxes fit the expected tile size
    chw: list[torch.Tensor | None] = []
    for i in range(len(raw.encoded_lengths)):
        if i in decoded:
            t = decoded[i]
        else:
            t = raw.predecoded[i].to(device, non_blocking=True).permute(2, 0, 1)
        if isinstance(t, Exception) or t.shape[0] != 3 or t.shape[1] < size[0] or t.shape[2] < size[1]:
            reason = t if isinstance(t, Exception) else f"decoded shape {tuple(t.shape)}"
            raw.failures.append(
                {
                    "store": store_urls[int(raw.store_indices[i])],
                    "slide": raw.slide_ids[i],
                    "tile": int(raw.tile_indices[i]),
                    "error": f"decode failed on {device}: {reason}",
                }
            )
            t = None
        chw.append(t)
    good = [i for i, t in enumerate(chw) if t is not None]
    if not good:
        raise RuntimeError(f"no tile of batch {raw.batch} (epoch {raw.epoch}) could be decoded on {device}")
    for i, t in enumerate(chw):
        if t is None:  # as on the CPU path: another tile of the batch takes the slot (and its identity)
            src = good[i % len(good)]
            chw[i] = chw[src]
            raw.slide_ids[i] = raw.slide_ids[src]
            raw.tile_indices[i] = raw.tile_indices[src]
            raw.store_indices[i] = raw.store_indices[src]
    if len({tuple(t.shape) for t in chw}) == 1:
        return torch.stack(chw).float().div_(255)
    h, w = max(t.shape[1] for t in chw), max(t.shape[2] for t in chw)
    out = torch.zeros(len(chw), 3, h, w, device=device, dtype=torch.float32)
    for i, t in enumerate(chw):
        out[i, :, : t.shape[1], : t.shape[2]] = t
    return out.div_(255)
