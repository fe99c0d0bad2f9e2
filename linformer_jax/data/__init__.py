"""Step-indexed numpy input pipelines: ListOps (LRA), byte-level MLM, digits / CIFAR-10.

Usage::

    ds = make_dataset(config.data, workdir)
    batch = ds.batch_at(step, global_batch_size, process_index=i, process_count=n)
    for batch in ds.eval_batches(global_batch_size): ...   # batch["valid"] marks real rows

`default_data_config(name)` holds the fields of dataset `name` only (its constructor's arguments, see
`registry`). `ds.info` describes the data (kind, num_classes / vocab_size, max_len / image_shape, num_train,
num_eval, majority_accuracy / unigram_perplexity, pad_id). See `base` for the ordering and seeding rules.
Nothing is downloaded; only numpy (+ scikit-learn for digits) is used.
"""
from linformer_jax.data.base import Dataset
from linformer_jax.data.images import ImageDataset
from linformer_jax.data.listops import ListOpsDataset
from linformer_jax.data.mlm import MLMDataset
from linformer_jax.data import registry
from linformer_jax.data.registry import data_fields, default_data_config, make_dataset

#: Names accepted by ``make_dataset`` and ``default_data_config`` (``registry.DATASETS``).
DATASETS = registry.DATASETS

__all__ = ["DATASETS", "Dataset", "ImageDataset", "ListOpsDataset", "MLMDataset", "data_fields",
           "default_data_config", "make_dataset"]
