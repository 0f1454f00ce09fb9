"""The jobs behind the ``ldm-vae`` commands and the demo, as library calls: no argparse, no exit codes.

Every workflow checks its inputs before it writes anything and raises :class:`WorkflowError` (one line) for
input the user can fix. Models are used through the common interface (:mod:`ldm_vae.interface`) only, so
each workflow runs on the KL and the VQ autoencoders alike (except the latent cache, which stores a posterior,
and code-index files, which index a codebook).
"""

from .base import (
    WorkflowError,
    batches,
    batches_by_shape,
    check_no_overwrite,
    files_of,
    image_sizes,
    load_batch,
    one_line,
    output_dir,
    output_stems,
    png_outputs,
    progress,
)
from .diffusion import cache_inputs, format_bits_table, ldm_eval, require_posterior, write_samples
from .latents_file import (
    FILE_FORMAT,
    INDICES_KEY,
    LATENTS_KEY,
    LatentsFile,
    codebook_sha256,
    decode_to_folder,
    encode_to_file,
    file_scaling,
    latent_scaling,
    metadata_list,
    read_latents_file,
    require_codebook,
    write_latents_file,
)
from .models import convert_checkpoint, describe_model, load_model, resolve_device
from .reports import (
    format_table,
    json_number,
    mean_metrics,
    print_table,
    reconstruct_images,
    write_reconstruct_report,
)

__all__ = [
    "FILE_FORMAT",
    "INDICES_KEY",
    "LATENTS_KEY",
    "LatentsFile",
    "WorkflowError",
    "batches",
    "batches_by_shape",
    "cache_inputs",
    "check_no_overwrite",
    "codebook_sha256",
    "convert_checkpoint",
    "decode_to_folder",
    "describe_model",
    "encode_to_file",
    "file_scaling",
    "files_of",
    "format_bits_table",
    "format_table",
    "image_sizes",
    "json_number",
    "latent_scaling",
    "ldm_eval",
    "load_batch",
    "load_model",
    "mean_metrics",
    "metadata_list",
    "one_line",
    "output_dir",
    "output_stems",
    "png_outputs",
    "print_table",
    "progress",
    "read_latents_file",
    "reconstruct_images",
    "require_codebook",
    "require_posterior",
    "resolve_device",
    "write_latents_file",
    "write_reconstruct_report",
    "write_samples",
]
