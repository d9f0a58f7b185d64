"""LaViDa's image preprocessing, rescaled and normalised by transformers' utilities. "anyres": per image, a global
view (the whole image squashed to view_size x view_size) followed by the view-size crops, in row-major order, of the
image resized into its best pinpoint canvas (black padding around it; the geometry is `image_layout`'s). "pad": one
view, the image centred on a square of the mean colour (LaViDa's expand2square) then resized; "square": one view,
the image resized.

Remote code with saved processors: it imports only `transformers` (and its dependencies), PIL, numpy and torch.
"""

import warnings

import httpx
import numpy as np
import torch
from huggingface_hub import is_offline_mode
from PIL import Image
from PIL._util import DeferredError
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import ChannelDimension, load_image
from transformers.processing_utils import ImagesKwargs

from .image_layout import IMAGE_ASPECT_RATIOS, resized_size_in_canvas, select_best_resolution

URL_TIMEOUT = 10.0  # seconds without progress before an image download fails
ACCEPTED_IMAGES = (
    "PIL images, uint8 or uint16 numpy arrays (HxW or HxWxC with C in 1, 3, 4), uint8 torch tensors (CxHxW with C in "
    "1, 3, 4), or a path or URL (transformers' load_image)"
)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's 16-bit greyscale (16-bit PNG/TIFF scans)
# PIL's own decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS as Pillow ships it): ~9459 x 9459 pixels
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (1-channel arrays are squeezed to HxW first)
EXIF_ORIENTATION = 0x0112  # values 2-8: mirrored and/or rotated (6: the camera was turned 90 degrees clockwise)


def _image_type_error(image, index: int) -> TypeError:
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    detail = f" of shape {tuple(shape)} and dtype {dtype}" if shape is not None else ""
    return TypeError(f"`images`[{index}] must be one of {ACCEPTED_IMAGES}; got {type(image).__name__}{detail}")


def _eight_bits(array: np.ndarray) -> np.ndarray:
    """uint8 levels of uint16 ones: round(v * 255 / 65535) = round(v / 257); uint8 unchanged."""
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8) if array.dtype == np.uint16 else array


def load_images(images: list) -> list:
    """`images` with every path or URL loaded by transformers' `load_image` (which applies EXIF orientation); a URL in
    offline mode (HF_HUB_OFFLINE) or one that cannot be fetched is an error naming it."""
    loaded = []
    for index, image in enumerate(images):
        if isinstance(image, str):
            if image.startswith(("http://", "https://")) and is_offline_mode():
                raise ValueError(f"`images`[{index}] is the URL {image}, but offline mode is on (HF_HUB_OFFLINE=1): "
                                 "download it and pass a path or a PIL image")
            try:
                image = load_image(image, timeout=URL_TIMEOUT)
            except (httpx.HTTPError, OSError, ValueError) as error:
                raise ValueError(f"`images`[{index}] ({image[:200]}) could not be loaded: {error}") from error
        loaded.append(image)
    return loaded


def _height_width(image) -> tuple:
    """(height, width) read without decoding or copying pixels; (1, 1) for what `to_rgb_image` refuses by type."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        return tuple(image.shape[1:])
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return tuple(image.shape[:2])
    return 1, 1


def to_rgb_image(image, index: int = 0) -> Image.Image:
    """The image as an RGB PIL image, by PIL's `.convert("RGB")` as in LaViDa.

    RGBA/LA drop their alpha channel (no compositing), L/1 repeat the grey level, P looks up its palette,
    CMYK/YCbCr/LAB/HSV use PIL's colour conversion. 16-bit greyscale (PIL "I;16" modes, uint16 arrays) becomes
    8 bits (v / 257, rounded); PIL modes "I" and "F" are refused (their range is unknown). Animated images use their
    current frame, with a warning. EXIF orientation is not applied (LaViDa's behaviour), with a warning naming it.
    NumPy arrays and torch tensors go through the PIL image of their channel count (1: L, 3: RGB, 4: RGBA).
    `index` names the image in errors (`images`[index]).
    """
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and len(image) in CHANNELS:
        image = image.permute(1, 2, 0).numpy()  # CxHxW -> HxWxC
    if isinstance(image, np.ndarray):
        array = _eight_bits(image)
        array = array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array
        if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in CHANNELS)):
            return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if not isinstance(image, Image.Image):
        raise _image_type_error(image, index)
    pixels = image.__dict__.get("_im", image.__dict__.get("im"))
    if isinstance(pixels, DeferredError) or (pixels is None and getattr(image, "fp", False) is None):
        raise ValueError(f"`images`[{index}] is a closed PIL image (its file was closed before its pixels were read):"
                         " call image.load() or image.copy() inside the `with Image.open(...)` block")
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "32-bit float"
        raise ValueError(f"`images`[{index}] has PIL mode {image.mode!r} ({kind} pixels), whose value range is "
                         "ambiguous: convert it to 8 bits first (for 16-bit data: image.point(lambda v: v / 257)"
                         ".convert('L'))")
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation != 1:
        warnings.warn(f"`images`[{index}] has EXIF orientation {orientation}: it is used as stored, not rotated, as "
                      "LaViDa does; call PIL.ImageOps.exif_transpose(image) first to see it upright", stacklevel=4)
    if getattr(image, "n_frames", 1) > 1:
        warnings.warn(f"`images`[{index}] is animated ({image.n_frames} frames): only its current frame "
                      f"(frame {image.tell()}) is used", stacklevel=4)
    try:
        if image.mode in SIXTEEN_BIT_MODES:
            return Image.fromarray(_eight_bits(np.asarray(image))).convert("RGB")
        return image.convert("RGB")
    except OSError as error:  # raised by PIL's lazy decoder on truncated or corrupt files
        raise ValueError(f"`images`[{index}] could not be decoded: {error}") from error


class LavidaShirgImagesKwargs(ImagesKwargs, total=False):
    """The parameters of `LavidaShirgImageProcessor` beyond the common image-processing ones."""

    view_size: int
    image_grid_pinpoints: list
    image_aspect_ratio: str
    max_image_pixels: int


class LavidaShirgImageProcessor(BaseImageProcessor):
    """LaViDa's preprocessing: per image, its views as normalised CHW float32 arrays ("anyres": [global view,
    crops...]; "pad" / "square": one view).

    Parameters: `view_size` (side of a vision view in pixels), `image_grid_pinpoints` ((height, width) canvases,
    multiples of view_size, in LaViDa's order: it breaks ties), `image_aspect_ratio` ("anyres", "pad" or "square",
    see the module), `image_mean`/`image_std` (per channel; "pad" fills with int(255 mean) per channel, as LaViDa),
    `rescale_factor` (pixel scale before normalising), `resample` (PIL filter code, 3 = bicubic) and
    `max_image_pixels` (larger images are refused before any pixel is copied; default: PIL's decompression-bomb
    threshold, 89,478,485 pixels; downscale larger images yourself, e.g. with `Image.thumbnail`).
    """

    valid_kwargs = LavidaShirgImagesKwargs
    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, view_size: int, image_grid_pinpoints: list, image_mean=(0.5, 0.5, 0.5),
                 image_std=(0.5, 0.5, 0.5), rescale_factor: float = 1 / 255,
                 resample: int = int(Image.Resampling.BICUBIC), max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 image_aspect_ratio: str = "anyres", **kwargs):
        super().__init__(**kwargs)
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {IMAGE_ASPECT_RATIOS}, got {image_aspect_ratio!r}")
        self.image_aspect_ratio = image_aspect_ratio
        self.view_size = int(view_size)
        self.image_grid_pinpoints = [[int(height), int(width)] for height, width in image_grid_pinpoints]
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.rescale_factor = float(rescale_factor)
        self.resample = int(resample)
        self.max_image_pixels = max_image_pixels
        sides = [side for pair in self.image_grid_pinpoints for side in pair]
        if self.view_size <= 0 or not sides or any(side <= 0 or side % self.view_size for side in sides):
            raise ValueError(f"image_grid_pinpoints must be (height, width) pairs of positive multiples of view_size "
                             f"({self.view_size} > 0), got {self.image_grid_pinpoints}")
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")

    def checked_rgb_image(self, image, index: int) -> Image.Image:
        """`to_rgb_image`, after refusing (before any copy) an empty image or one above max_image_pixels."""
        height, width = _height_width(image)
        if not 0 < height * width <= self.max_image_pixels:
            raise ValueError(f"`images`[{index}] has {height} x {width} = {height * width:,} pixels: it needs at least "
                             f"one and at most max_image_pixels ({self.max_image_pixels:,}); downscale it first (e.g. "
                             "image.thumbnail((4096, 4096))) or raise the image processor's max_image_pixels")
        return to_rgb_image(image, index)

    def views(self, image: Image.Image) -> list:
        """LaViDa's views of an RGB image: "anyres": [global view, crops of the padded best-pinpoint canvas,
        row-major]; "pad": [the image pasted at ((side - w) // 2, (side - h) // 2) on a side x side square (side =
        max(h, w)) of colour int(255 image_mean), resized]; "square": [the image resized]."""
        step = self.view_size
        if self.image_aspect_ratio == "pad":
            side = max(image.height, image.width)
            fill = tuple(int(mean * 255) for mean in self.image_mean)
            square = Image.new("RGB", (side, side), fill)
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            return [square.resize((step, step), self.resample)]
        if self.image_aspect_ratio == "square":
            return [image.resize((step, step), self.resample)]
        size = (image.height, image.width)
        canvas_h, canvas_w = select_best_resolution(size, self.image_grid_pinpoints)
        new_h, new_w = resized_size_in_canvas(size, (canvas_h, canvas_w))
        canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), self.resample), ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
        crops = [canvas.crop((left, top, left + step, top + step))
                 for top in range(0, canvas_h, step) for left in range(0, canvas_w, step)]
        return [image.resize((step, step), self.resample), *crops]

    def pixel_values(self, views: list, do_rescale=True, rescale_factor=None, do_normalize=True, image_mean=None,
                     image_std=None) -> np.ndarray:
        """(num_views, 3, S, S) float32: transformers' `rescale` (x rescale_factor, in float64 then float32) and
        `normalize` ((x - mean) / std) of the views' pixels, as SigLIP's image processor in LaViDa; None takes this
        processor's value."""
        pixels = np.stack([np.asarray(view) for view in views])  # (V, S, S, 3) uint8
        last = ChannelDimension.LAST
        if do_rescale:
            pixels = self.rescale(pixels, self.rescale_factor if rescale_factor is None else rescale_factor,
                                  input_data_format=last)
        if do_normalize:
            pixels = self.normalize(pixels, self.image_mean if image_mean is None else image_mean,
                                    self.image_std if image_std is None else image_std, input_data_format=last)
        return pixels.astype(np.float32).transpose(0, 3, 1, 2)

    def preprocess(self, images, return_tensors="pt", hires_size=None, **scaling) -> BatchFeature:
        """`pixel_values` (all images' views, concatenated in order) and `image_sizes` ((height, width) per image);
        with `hires_size`, also `hires_pixel_values` (one view per image: the whole image squashed to
        hires_size x hires_size, like the global view) for SHIRG's high-resolution selection.

        `images`: one image or a list of them (see `to_rgb_image`; paths and URLs go through `load_images`); an
        empty list gives an empty BatchFeature.
        `scaling`: do_rescale, rescale_factor, do_normalize, image_mean, image_std (see `pixel_values`).
        """
        images = load_images(list(images) if isinstance(images, (list, tuple)) else [images])
        rgb_images = [self.checked_rgb_image(image, index) for index, image in enumerate(images)]
        if not rgb_images:
            return BatchFeature({}, tensor_type=return_tensors)
        outputs = {
            "pixel_values": np.concatenate([self.pixel_values(self.views(image), **scaling) for image in rgb_images]),
            "image_sizes": np.array([[image.height, image.width] for image in rgb_images], dtype=np.int64),
        }
        if hires_size is not None:
            hires = [image.resize((hires_size, hires_size), self.resample) for image in rgb_images]
            outputs["hires_pixel_values"] = self.pixel_values(hires, **scaling)
        return BatchFeature(outputs, tensor_type=return_tensors)


LavidaShirgImageProcessor.register_for_auto_class("AutoImageProcessor")
