"""Shared machinery of the prepared clip datasets (CREMA-D, AVE, Kinetics-Sounds, UCF-101).

Every video dataset is used in two steps: ``mmbalance prepare NAME --raw DIR --out DIR`` decodes
the raw release once into per-clip ``.npy`` files plus ``manifest.csv`` (``clip,label,split``)
and ``prepare_report.json``; the dataset source then stacks those files into tensors, cached by
:func:`mmbalance.data.cache.cached_arrays` and loaded memory-mapped on later runs. This package
holds the pieces the datasets share, so each dataset file only knows its release's layout:

* :mod:`~mmbalance.data.clips.decode`: finding and decoding media (WAV files and video audio
  tracks, video frames at 1 fps or at segment centres, image files);
* :mod:`~mmbalance.data.clips.frontends`: the papers' audio front-ends (OGM-GE's log-STFT and
  the Kaldi-style fbank of OGM-GE's ``process_audio.py``);
* :mod:`~mmbalance.data.clips.prepared`: a prepared directory's files (crash-safe per-clip
  arrays, the manifest, the class list, the options it was prepared with), the checks that keep every
  path inside it and the fingerprint of its files;
* :mod:`~mmbalance.data.clips.jobs`: the parallel, progress-barred preparation whose jobs never
  raise but return an error string, so one corrupt file is skipped and reported;
* :mod:`~mmbalance.data.clips.tensors`: stacking, the train/val/test split rule, the
  normalisation of frames and :class:`ClipDataset`;
* :mod:`~mmbalance.data.clips.source`: :class:`ClipSource`, the registered dataset class of a
  prepared dataset (its options, ``prepare`` and ``build``), and :class:`AudioVisualSource`,
  the audio + frames bundle that CREMA-D, AVE and Kinetics-Sounds share.

The names the datasets use are re-exported here (``clips.Release``, ``clips.check_clip_name``).
"""

from __future__ import annotations

from mmbalance.data.clips.decode import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    decode_frames,
    decode_frames_at,
    image_files,
    index_files,
    index_frame_dirs,
    read_audio_track,
    read_images,
    read_wav,
    segment_centres,
)
from mmbalance.data.clips.frontends import (
    FBANK_SR,
    STFT_SECONDS,
    STFT_SR,
    fbank_features,
    stft_features,
)
from mmbalance.data.clips.jobs import (
    JobResult,
    Release,
    av_outputs,
    prepare_av_clip,
    prepare_clips,
    print_report,
    run_jobs,
)
from mmbalance.data.clips.prepared import (
    PREPARE_OPTIONS_FILE,
    check_clip_name,
    files_stamp,
    inside,
    load_npy,
    read_classes,
    read_manifest,
    record_prepare_options,
    save_npy,
    write_manifest,
)
from mmbalance.data.clips.source import (
    AudioVisualParams,
    AudioVisualPrepareParams,
    AudioVisualSource,
    ClipParams,
    ClipPrepareParams,
    ClipSource,
)
from mmbalance.data.clips.tensors import (
    AV_TO_TENSOR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipDataset,
    av_parts,
    check_disjoint_splits,
    content_ids,
    frames_transform,
    normalise_flow,
    normalise_rgb,
    pick_frames,
    split_indices,
    stack_clips,
    to_clip_tensor,
)

__all__ = [
    "AV_TO_TENSOR",
    "FBANK_SR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "PREPARE_OPTIONS_FILE",
    "STFT_SECONDS",
    "STFT_SR",
    "VIDEO_SUFFIXES",
    "AudioVisualParams",
    "AudioVisualPrepareParams",
    "AudioVisualSource",
    "ClipDataset",
    "ClipParams",
    "ClipPrepareParams",
    "ClipSource",
    "JobResult",
    "Release",
    "av_outputs",
    "av_parts",
    "check_clip_name",
    "check_disjoint_splits",
    "content_ids",
    "decode_frames",
    "decode_frames_at",
    "fbank_features",
    "files_stamp",
    "frames_transform",
    "image_files",
    "index_files",
    "index_frame_dirs",
    "inside",
    "load_npy",
    "normalise_flow",
    "normalise_rgb",
    "pick_frames",
    "prepare_av_clip",
    "prepare_clips",
    "print_report",
    "read_audio_track",
    "read_classes",
    "read_images",
    "read_manifest",
    "read_wav",
    "record_prepare_options",
    "run_jobs",
    "save_npy",
    "segment_centres",
    "split_indices",
    "stack_clips",
    "stft_features",
    "to_clip_tensor",
    "write_manifest",
]
