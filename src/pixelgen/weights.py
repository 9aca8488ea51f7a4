"""Where pretrained weights live, how they get there once, and how to tell real from missing, corrupt or random.

Nothing downloads at run time: `pixelgen weights fetch` fills the weights directory where a network exists,
every loader reads only that directory, and a missing file is a one-line error naming the path and the fetch
command. A file that loads but does not match the published checksum (for example random weights written by
`pixelgen weights init-random` for tests) is usable, but everything made with it is labelled not comparable.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import PixelgenError
from .files import atomic_open, sha256, write_atomic

FETCH_HINT = "run `pixelgen weights fetch` on a machine with a network, or copy the file there by hand"


def fetch_hint(key: str) -> str:
    """How to get one file: on-demand files are fetched only when named."""
    if WEIGHT_FILES[key].on_demand:
        return FETCH_HINT.replace("weights fetch", f"weights fetch --only {key}")
    return FETCH_HINT
SUMS_FILE = "SHA256SUMS"  # written by `weights fetch`: the digest of each file as downloaded


@dataclass(frozen=True)
class WeightFile:
    key: str          # short name used on the command line
    filename: str
    url: str
    sha256_prefix: str | None  # published digest prefix (torchvision/torch-fidelity name their files by it)
    what: str
    on_demand: bool = False  # large files that `fetch`/`check` handle only when named with --only


WEIGHT_FILES: dict[str, WeightFile] = {
    w.key: w for w in [
        WeightFile("vgg16", "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth",
                   "397923af", "VGG16 ImageNet backbone for LPIPS (torchvision state dict)"),
        WeightFile("dinov2-b", "vit_base_patch14_dinov2.lvd142m.safetensors",
                   "https://huggingface.co/timm/vit_base_patch14_dinov2.lvd142m/resolve/main/model.safetensors",
                   None, "DINOv2 ViT-B/14 for REPA and P-DINO (timm safetensors)"),
        WeightFile("inception", "weights-inception-2015-12-05-6726825d.pth",
                   "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                   "weights-inception-2015-12-05-6726825d.pth",
                   "6726825d", "FID Inception-v3 (torch-fidelity state dict)"),
        # The official releases and the ADM reference batch have no published digest: `fetch` records the one it
        # downloaded in SHA256SUMS, and results are labelled comparable only while the file still matches it.
        WeightFile("pixelgen-xl-80ep", "PixelGen_XL_80ep.ckpt",
                   "https://huggingface.co/zehongma/PixelGen/resolve/main/PixelGen_XL_80ep.ckpt", None,
                   "official PixelGen-XL/16, 80 epochs (FID 5.11 without guidance)", on_demand=True),
        WeightFile("pixelgen-xl-160ep", "PixelGen_XL_160ep.ckpt",
                   "https://huggingface.co/zehongma/PixelGen/resolve/main/PixelGen_XL_160ep.ckpt", None,
                   "official PixelGen-XL/16, 160 epochs (FID 1.83 with guidance)", on_demand=True),
        WeightFile("adm-ref-imagenet256", "VIRTUAL_imagenet256_labeled.npz",
                   "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                   "VIRTUAL_imagenet256_labeled.npz", None,
                   "ADM reference batch for ImageNet 256 (FID/sFID/precision/recall reference)", on_demand=True),
    ]
}
DEFAULT_KEYS = [k for k, w in WEIGHT_FILES.items() if not w.on_demand]


def weights_dir(configured: str | None = None) -> Path:
    """The configured directory, else $PIXELGEN_WEIGHTS, else ~/.cache/pixelgen/weights."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("PIXELGEN_WEIGHTS")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "pixelgen" / "weights"


def weight_path(key: str, directory: Path | str | None = None) -> Path:
    """Path of a weight file that must exist; a clear PixelgenError when it does not."""
    wf = WEIGHT_FILES[key]
    path = weights_dir(str(directory) if directory else None) / wf.filename
    if not path.is_file():
        raise PixelgenError(f"missing {wf.what}: {path} not found; {fetch_hint(key)} "
                            f"(or set encoders.random_init=true for a test run)")
    return path


def _recorded_sums(directory: Path) -> dict[str, str]:
    sums = {}
    path = directory / SUMS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                sums[parts[1]] = parts[0]
    return sums


def is_published(key: str, path: Path) -> bool:
    """True when the file's digest matches the published prefix (or, lacking one, the digest recorded at fetch)."""
    wf = WEIGHT_FILES[key]
    digest = sha256(path)
    if wf.sha256_prefix is not None:
        return digest.startswith(wf.sha256_prefix)
    return _recorded_sums(path.parent).get(wf.filename) == digest


def check_loadable(key: str, path: Path) -> str | None:
    """None if the file parses as the expected weights, else the reason it does not."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix == ".npz":
            import numpy as np

            state = dict.fromkeys(np.load(path).files)
        elif path.suffix == ".ckpt":  # a Lightning checkpoint holds non-tensor state; mmap avoids reading 2.7 GB
            import torch

            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any parse failure means the file is unusable
        return f"cannot be read ({type(err).__name__})"
    expected = {"vgg16": "features.0.weight", "dinov2-b": "patch_embed.proj.weight", "inception": "Conv2d_1a_3x3.conv.weight",
                "pixelgen-xl-80ep": "state_dict", "pixelgen-xl-160ep": "state_dict", "adm-ref-imagenet256": "arr_0"}
    if not isinstance(state, dict) or expected[key] not in state:
        return f"does not hold the expected tensors ({expected[key]} missing)"
    return None


def status(key: str, directory: Path) -> tuple[str, str]:
    """('ok' | 'random' | 'missing' | 'corrupt', detail) for one weight file."""
    path = directory / WEIGHT_FILES[key].filename
    if not path.is_file():
        return "missing", str(path)
    problem = check_loadable(key, path)
    if problem:
        return "corrupt", f"{path} {problem}; delete it and {fetch_hint(key)}"
    if is_published(key, path):
        return "ok", str(path)
    return "random", f"{path} loads but is not the published file (metrics made with it are not comparable)"


def all_published(keys, directory: Path) -> bool:
    return all(status(k, directory)[0] == "ok" for k in keys)


def fetch(key: str, directory: Path, progress: bool = True) -> Path:
    """Download one weight file to `directory` atomically and check its digest."""
    wf = WEIGHT_FILES[key]
    target = directory / wf.filename
    try:
        # the digest is taken while streaming; a wrong one raises inside atomic_open, so no file appears
        with urllib.request.urlopen(wf.url, timeout=60) as response, atomic_open(target) as out:
            digest = _download(response, out, wf.filename, progress)
            if wf.sha256_prefix and not digest.startswith(wf.sha256_prefix):
                raise PixelgenError(f"downloaded {wf.filename} has sha256 {digest[:12]}..., expected "
                                    f"{wf.sha256_prefix}...; retry `pixelgen weights fetch`")
    except OSError as err:
        raise PixelgenError(f"cannot download {wf.url} ({err.__class__.__name__}: {err}); "
                            f"without a network, copy {wf.filename} into {directory} by hand") from None
    sums = _recorded_sums(directory)
    sums[wf.filename] = digest
    write_atomic(directory / SUMS_FILE, "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    return target


def _download(response, out, name: str, progress: bool) -> str:
    """Copy the response into `out` in 1 MiB blocks; returns the hex sha256 of what was written."""
    import hashlib

    from tqdm import tqdm

    digest = hashlib.sha256()
    total = int(response.headers.get("Content-Length") or 0)
    with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
        for block in iter(lambda: response.read(1 << 20), b""):
            out.write(block)
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def init_random(directory: Path, keys=None, seed: int = 0) -> list[Path]:
    """Write randomly initialised weights in the real files' formats (for tests and offline demos)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys or DEFAULT_KEYS:
        target = directory / WEIGHT_FILES[key].filename
        if key == "vgg16":
            state = torchvision.models.vgg16(weights=None).state_dict()
            write_atomic(target, lambda f: torch.save(state, f))
        elif key == "dinov2-b":
            import timm
            from safetensors.torch import save

            net = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0)
            write_atomic(target, save({k: v.contiguous() for k, v in net.state_dict().items()}))
        elif key == "inception":
            state = _random_inception_state()
            write_atomic(target, lambda f: torch.save(state, f))
        elif key.startswith("pixelgen-"):  # a random XL/16 in the release's layout (2.7 GB)
            from .model import JiT, SIZES
            from .official import release_format

            state = release_format(JiT(SIZES["XL/16"]))
            write_atomic(target, lambda f: torch.save(state, f))
        elif key == "adm-ref-imagenet256":  # 1,000 random images and statistics of the batch's shapes
            import numpy as np

            rng = np.random.default_rng(seed)
            arrays = dict(arr_0=rng.integers(0, 256, (1000, 256, 256, 3), dtype=np.uint8), mu=rng.normal(size=2048),
                          sigma=np.eye(2048), mu_s=rng.normal(size=2023), sigma_s=np.eye(2023))
            write_atomic(target, lambda f: np.savez(f, **arrays))
        written.append(target)
    return written


def _random_inception_state() -> dict:
    """The state dict of torch-fidelity's FID Inception-v3 as built, before any weights are loaded into it."""
    import tempfile

    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    original_load = cls.load_state_dict
    # torch-fidelity loads weights inside __init__; skip that load so the layers keep their random init
    cls.load_state_dict = lambda self, *args, **kwargs: None
    try:
        with tempfile.NamedTemporaryFile(suffix=".pth") as empty:
            torch.save({}, empty.name)
            net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty.name)
    finally:
        cls.load_state_dict = original_load
    # PyTorch's default init shrinks activations ~10x per layer over Inception's depth (features ~1e-8, all
    # alike); He init keeps them alive, so random-weight metrics still tell different image sets apart.
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.state_dict()


def fetch_missing(keys, directory: Path, force: bool = False):
    """Fetch each key that is not already present and published; yields (key, what happened)."""
    for key in keys:
        if status(key, directory)[0] == "ok" and not force:
            yield key, "ok (already present)"
            continue
        yield key, f"fetched -> {fetch(key, directory)}"


def check_all(keys, directory: Path) -> tuple[list[tuple[str, str, str]], bool]:
    """(key, state, detail) for each key, and whether all are usable (present and readable; random is usable)."""
    rows = [(key, *status(key, directory)) for key in keys]
    return rows, all(state in ("ok", "random") for _, state, _ in rows)
