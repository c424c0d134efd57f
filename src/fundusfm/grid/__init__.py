"""The experiment grid: cells (task x init x method x resolution x fraction x fold), their
fingerprints and status (`cells`), running them (`runner`), and the report built from their
predictions: `report` (classification) and `seg_report` (vessels) collect and compare,
`seg_matrix` sets vessel models' external sets beside their own test sets;
`tables` holds the shared columns and completeness; `figures` draws the curves and ROC
plots; `findings` writes the headline (best init, Holm-adjusted comparisons), `methods` the
paragraph for a paper, `gallery` the Grad-CAM and t-SNE sections, and `html` the one offline
page. Everything but `runner` stays off torch, so `grid status` and `grid report` start fast;
`runner` imports the tasks.
"""
