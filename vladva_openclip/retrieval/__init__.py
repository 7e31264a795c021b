"""Embeddings at scale, FAISS indexes and search, for any open_clip model (VladVA or not).

Python::

    from vladva_openclip.retrieval import EmbedJobConfig, run_embed, build_index, run_search, Query, write_html
    run_embed(EmbedJobConfig("images/", "emb/", model="vladva-llava7b", pretrained="my_adapter/"))
    build_index("emb/", "index/")                                   # FAISS, chosen by size
    results = run_search("index/", [Query("text", "a dog on a red sofa")], k=10)
    write_html(results, "results.html")

Command line: ``vladva embed`` (also under ``torchrun``), ``vladva index``, ``vladva search``. The embedding folder
follows clip-retrieval's layout (:mod:`.layout`), so its tools read it too.
"""
from .embed import EmbedJobConfig, EmbedJobError, run_embed
from .html import render_html, write_html
from .index import IndexConfig, build_index, choose_index
from .layout import EmbeddingFolder
from .search import Query, Searcher, embed_queries, run_search

__all__ = [
    "EmbedJobConfig",
    "EmbedJobError",
    "EmbeddingFolder",
    "IndexConfig",
    "Query",
    "Searcher",
    "build_index",
    "choose_index",
    "embed_queries",
    "render_html",
    "run_embed",
    "run_search",
    "write_html",
]
