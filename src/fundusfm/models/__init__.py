"""Models: the backbone seam (`backbone`, torchvision ResNets), classification heads
(`heads`), the vessel U-Net (`unet`), the one place that turns an init name or bundle into
weights (`inits`) and bundles loaded as models for inference (`loaded`). Imports `bundle`,
`data.transforms`, `config` and `errors`.
"""
