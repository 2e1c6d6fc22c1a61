"""`oodguard queue sheet`'s drawing: records as a PNG contact sheet and its legend of full ids.

Each tile is the record's model input turned back into pixels with its version's preprocessing (from the model
repository's calibration.json; normalisation undone, resizing not), captioned with the end of its id
(:func:`short_ids`) and its deciding score.
"""

from __future__ import annotations

import json
import math

import numpy as np

from .queue_format import score_text

#: contact sheet tiles: the image box (``--tile-size``) plus this margin on each side and the caption below it
TILE_PAD = 4
CAPTION_HEIGHT = 26


def tile_shape(tile_size: int) -> tuple[int, int]:
    """(width, height) of one contact sheet tile for ``--tile-size``: the image box, a margin, the caption."""
    return tile_size + 2 * TILE_PAD, tile_size + 2 * TILE_PAD + CAPTION_HEIGHT


def short_ids(ids: list[str], least: int = 8) -> list[str]:
    """Captions for these record ids: the shortest common length of their ends, at least ``least`` characters,
    that tells all of them apart. Ends, not starts: ids are UUIDv7 (:func:`oodguard.queues.base.new_record_ids`),
    whose first 12 hex digits are the millisecond they were queued and the next 4 its fraction, so the records of
    one request share their first 16 digits; the last 15 digits are random (and uuid4 ids, random throughout,
    differ at their ends too)."""
    longest = max((len(i) for i in ids), default=0)
    length = min(least, longest)
    while len({i[-length:] for i in ids}) < len(set(ids)) and length < longest:
        length += 1
    return [i[-length:] for i in ids]


def _tile(pixels, caption: list[str], tile_size: int, font):
    from PIL import Image, ImageDraw

    image = Image.fromarray(pixels).convert("RGB")
    scale = tile_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)
    tile = Image.new("RGB", tile_shape(tile_size), (255, 255, 255))
    tile.paste(image, (TILE_PAD + (tile_size - size[0]) // 2, TILE_PAD + (tile_size - size[1]) // 2))
    draw = ImageDraw.Draw(tile)
    for n, line in enumerate(caption):  # drawn on the tile: a caption too long for it is cut at its edge
        draw.text((TILE_PAD, TILE_PAD + tile_size + 2 + n * (CAPTION_HEIGHT // 2)), line, fill=(0, 0, 0), font=font)
    return tile


def write_sheet(records: list, total: int, args) -> None:
    """Draw ``records`` (a sample of ``total`` matching ones) to ``args.out`` and their ids to ``args.out``.json;
    a ValueError when the repository lacks a version's calibration or a record's input does not fit it."""
    from PIL import Image, ImageFont

    from oodguard.harvest.versions import CalibrationCache
    from oodguard.preprocess import Preprocessing

    calibrations = CalibrationCache(args.repository)
    missing = sorted({(r.model, r.version) for r in records if not calibrations.has(r.model, r.version)})
    if missing:
        raise ValueError(f"the repository {args.repository} holds no calibration.json for "
                         f"{', '.join(f'{m} version {v}' for m, v in missing)} (the preprocessing that turns their "
                         "inputs back into pixels); give --repository, or leave them out with --model / --version")
    preprocessing = {}
    font = ImageFont.load_default()
    tiles = []
    captions = short_ids([r.id for r in records])
    for r, caption in zip(records, captions):
        key = (r.model, r.version)
        if key not in preprocessing:
            preprocessing[key] = Preprocessing.from_dict(calibrations.get(*key).model["preprocessing"])
        try:
            pixels = preprocessing[key].invert(r.input)
        except ValueError as exc:
            raise ValueError(f"record {r.id}: its input {tuple(np.shape(r.input))} does not fit the preprocessing "
                             f"of {r.model} version {r.version}: {exc}") from exc
        tiles.append(_tile(pixels, [caption, score_text(r, args.score)], args.tile_size, font))
    columns = min(args.columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    width, height = tile_shape(args.tile_size)
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, ((n % columns) * width, (n // columns) * height))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, format="PNG")
    legend = args.out.with_name(args.out.name + ".json")  # captions show the ends of the ids: the full ones
    legend.write_text(json.dumps([{"tile": n, "id": r.id, "caption": caption, "model": r.model, "version": r.version,
                                   "score": score_text(r, args.score)}
                                  for n, (r, caption) in enumerate(zip(records, captions), 1)], indent=1))
    print(f"wrote {args.out}: {len(tiles)} tile(s), {columns} x {rows} ({sheet.width}x{sheet.height} px), "
          f"a sample of {total} matching {args.state} record(s) (seed {args.seed}); tile ids in {legend}")


__all__ = ["TILE_PAD", "CAPTION_HEIGHT", "tile_shape", "short_ids", "write_sheet"]
