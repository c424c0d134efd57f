"""The local web app and JSON API (`fundusfm serve BUNDLE`).

`app.create_app` builds a FastAPI app around one classifier bundle, loaded once;
`screening` turns each upload into the row `fundusfm predict` gives the same file (through
`screen.predict`'s per-file functions), after `sniff` has judged it from its header (its
format when its name has no image suffix, its size against `max_pixels`); `upload` reads the
request body within the size limit, once the request has its turn at `gate`, which bounds
how many bodies are in memory; `table` writes rows as predict's predictions.csv
(`POST /v1/csv`); `model_info` is `GET /v1/model` (the model card as JSON); `assets` holds
the page (page.html, page.js, page.css: plain files, no build step, nothing fetched from
elsewhere) and the report's colours; `server` binds the port and runs the app with uvicorn.
Imports `screen` (predict's functions, the report's threshold words, colours and tones),
`explain`, `inference`, `tasks.shift`, `models`, `bundle`, `card`, `card_metrics`, `weights`
(the card's metrics), `config`, `data.decode` (suffixes, the bomb limit), `data.manifest`
(printable names) and `errors`, plus FastAPI, uvicorn and python-multipart (the `serve`
extra); nothing imports `serve` but `cli`.
"""
