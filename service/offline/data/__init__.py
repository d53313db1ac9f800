"""The offline path's data layer: datasets, their split, item features, the synthetic world,
sampling of training windows."""
