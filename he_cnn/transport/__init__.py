"""How S1 reaches S2: the channel, one request per protocol round with its counters (:mod:`.channel`),
in-process or over HTTP (:mod:`.http_channel`). The byte format itself is :mod:`he_cnn.wire`."""
