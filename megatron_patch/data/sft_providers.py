"""SFT train/valid/test datasets for `pretrain()`: idxmap (preprocessed) or raw JSON (tokenized on the fly)."""

from __future__ import annotations

from megatron.training import print_rank_0

from megatron_patch.data.sft_dataset import RawJSONSFTDataset, SFTIdxMapDataset
from megatron_patch.errors import UserError


def _one_path(paths, what: str) -> str:
    if not paths:
        raise UserError(f"error: SFT needs --{what}-data-path (DATASET_PATH / VALID_DATASET_PATH in run_mcore_qwen.sh).")
    if len(paths) != 1:
        raise UserError(f"error: SFT takes one --{what}-data-path, got {len(paths)}: {' '.join(paths)}")
    return paths[0]


def build_sft_datasets(args, num_samples):
    train_path = _one_path(args.train_data_path, "train")
    valid_path = _one_path(args.valid_data_path, "valid")
    # Upstream passed the validation file as the test file too, evaluating it twice: no test set unless asked.
    test_path = _one_path(args.test_data_path, "test") if args.test_data_path else None
    packing = args.sft_packing
    if args.dataset_type == "raw":
        from megatron_patch.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer_model)
        # Raw samples are padded to PAD_LEN (--max-padding-length), which the launcher keeps <= SEQ_LEN.
        length = args.max_padding_length or args.seq_length

        def build(path, n, seed):
            return RawJSONSFTDataset(path, tokenizer, length, n, seed, packing)
    else:
        def build(path, n, seed):
            return SFTIdxMapDataset(path, args.seq_length, n, seed, packing)

    datasets = []
    for path, n, offset in ((train_path, num_samples[0], 0), (valid_path, num_samples[1], 1),
                            (test_path, num_samples[2], 2)):
        datasets.append(build(path, n, args.seed + offset) if n and path else None)
        if datasets[-1] is not None:
            print_rank_0(f"> SFT {('train', 'valid', 'test')[offset]}: {datasets[-1].describe()}, {n} samples"
                         + (", packed" if packing else ""))
    return tuple(datasets)
