"""The offline path's training layer: training ACF, SASRec and the baselines, from a dataset to
a checkpoint."""
