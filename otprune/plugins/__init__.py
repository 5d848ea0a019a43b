"""Peer methods written as outside plugins would write them: through the public API only
(``otprune.contract``, ``otprune.selectors``), found and checked as entry points are
(``otprune.methods.BUNDLED``)."""
