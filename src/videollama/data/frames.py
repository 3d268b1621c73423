"""One decoded frame -> the model's pixels: square crop, resize (swscale), rotation."""

from __future__ import annotations

import av
import numpy as np
from av.video.reformatter import VideoReformatter


def resize_crop_frame(
    frame: av.VideoFrame,
    size: int,
    *,
    crop_fraction: tuple[float, float] = (0.5, 0.5),
    reformatter: VideoReformatter | None = None,
) -> np.ndarray:
    """One decoded frame -> uint8 RGB ``(size, size, 3)``: square crop, resize, rotate.

    The crop is the largest square of the coded frame (its side is the short side), placed
    along the long side by ``crop_fraction`` (x, y) in [0, 1] (0.5 centres it); swscale
    then scales it to ``size x size`` (bilinear, antialiased when shrinking) and converts
    YUV to RGB in the same pass; finally the display matrix's rotation is applied. This is
    "short side to ``size``, then crop", with the crop done first so that swscale scales only
    the pixels kept: for 4:2:0 video (nearly all video) the square is copied out of the
    decoded planes (offsets and side rounded to even, to keep chroma aligned). Other pixel
    formats take the plain route: scale the whole frame, then crop.
    """
    reformatter = reformatter or VideoReformatter()
    width, height = frame.width, frame.height
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    # The crop position is drawn in display coordinates; on a frame shown turned by 90 or
    # 270 degrees the display's x runs along the coded frame's y.
    fraction_x, fraction_y = crop_fraction if quarter_turns % 2 == 0 else crop_fraction[::-1]
    if frame.format.name in ("yuv420p", "yuvj420p") and min(width, height) >= 2:
        side = min(width, height) // 2 * 2
        left = round(fraction_x * (width - side)) // 2 * 2
        top = round(fraction_y * (height - side)) // 2 * 2
        square = _crop_yuv420(frame, left, top, side)
        rgb = reformatter.reformat(square, width=size, height=size, format="rgb24",
                                   interpolation="BILINEAR", threads=1).to_ndarray()
    else:
        short = min(width, height)
        # Round the long side; the short side maps exactly to ``size``.
        new_width = size if width == short else max(size, round(width * size / short))
        new_height = size if height == short else max(size, round(height * size / short))
        # threads=1: swscale's own slice threads only add overhead when every core runs a loader.
        rgb = reformatter.reformat(frame, width=new_width, height=new_height, format="rgb24",
                                   interpolation="BILINEAR", threads=1).to_ndarray()
        top = round(fraction_y * (new_height - size))
        left = round(fraction_x * (new_width - size))
        rgb = rgb[top:top + size, left:left + size]
    if quarter_turns:
        rgb = np.rot90(rgb, k=quarter_turns)  # counter-clockwise, as the display matrix says
    return np.ascontiguousarray(rgb)


def _crop_yuv420(frame: av.VideoFrame, left: int, top: int, side: int) -> av.VideoFrame:
    """A ``side x side`` 4:2:0 frame copied from ``frame`` at (left, top), all even.

    The copy goes into a frame that FFmpeg allocates, so its rows are aligned the way
    swscale's SIMD paths want (a numpy-built frame with odd strides scales slower).
    """
    square = av.VideoFrame(side, side, frame.format.name)
    square.colorspace, square.color_range = frame.colorspace, frame.color_range
    chroma = (left // 2, top // 2, (side + 1) // 2)
    for plane_index, (x, y, extent) in enumerate([(left, top, side), chroma, chroma]):
        source, target = frame.planes[plane_index], square.planes[plane_index]
        source_rows = np.frombuffer(source, np.uint8).reshape(source.height, source.line_size)
        target_rows = np.frombuffer(target, np.uint8).reshape(target.height, target.line_size)
        target_rows[:extent, :extent] = source_rows[y:y + extent, x:x + extent]
    return square
