"""The local web app and JSON API (`fundusfm serve BUNDLE`).

`app.create_app` builds a FastAPI app around one classifier bundle, loaded once;
`screening` turns each upload into the row `fundusfm predict` gives the same file (through
`screen.predict`'s per-file functions), `upload` reads the request body within the size
limit, `model_info` is `GET /v1/model` (the model card as JSON), `server` runs the app with
uvicorn, and page.html, page.js and page.css are the page (plain files, no build step,
nothing fetched from elsewhere). Imports `screen`, `explain`, `inference`, `tasks.shift`,
`models`, `bundle`, `card`, `card_metrics`, `weights` (the card's metrics), `config`,
`data.manifest` (printable names) and `errors`, plus FastAPI, uvicorn and python-multipart
(the `serve` extra); nothing imports `serve` but `cli`.
"""
