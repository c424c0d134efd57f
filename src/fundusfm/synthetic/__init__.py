"""Generated fundus photographs for the demo and the tests: the canvas and anatomy
(`canvas`, `render`), lesions and disease grades (`lesions`), and whole labelled datasets with
masks and a manifest (`generate`, behind `fundusfm synth`). Imports `config` and
`data.manifest` only.
"""
