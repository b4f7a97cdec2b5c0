"""Data: pre-training and SFT preprocessing to Megatron idxmaps, and the datasets the trainer reads.

Modules (import the one you need; this package imports nothing heavy, so preprocessing workers start fast):
    records              reading JSON / JSONL / plain-text inputs with file:line error locations
    parallel             an ordered, bounded process pool
    indexed_writer       all-or-nothing .bin/.idx writing and merging (Megatron IndexedDatasetBuilder)
    idxmap_stamp         the stamp that ties an .idx to its .bin, and the .idx header facts
    dataset_checks       dataset_problem: the one check of a dataset path (launcher and datasets)
    blend                a data path as one dataset or a blend 'W1 P1 W2 P2 ...'
    upstream_flags       Pai-Megatron-Patch's flag spellings on the two preprocessing tools
    pretrain_preprocess  text -> token ids + end-of-document -> idxmap
    sft                  build_sft_sample (chat template + answer mask), plan_packing
    sft_preprocess       SFT records -> text/label idxmap pair (optionally packed)
    sft_dataset          SFTIdxMapDataset, RawJSONSFTDataset, open_sft_idxmap
    upstream_sft_idxmap  SFT idxmaps built by Pai-Megatron-Patch's own tool, read as our samples
    providers            what pretrain() calls: the datasets (GPTDataset blends, or SFT) and get_batch
    sft_providers        the SFT train/valid/test datasets (or blends of them) from the entrypoint's arguments
"""

# What a stopped preprocessing tool says it left (indexed_writer writes all outputs or none).
IDXMAP_NOT_WRITTEN = "no idxmap was written (one already at this output prefix is unchanged); run the same command again"
