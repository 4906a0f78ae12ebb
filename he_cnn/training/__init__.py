"""The owner's model side in torch: the patent's ICNN (:mod:`.icnn`), its data (:mod:`.data`), training
(:mod:`.train`) and quantisation into the integer graph (:mod:`.quantize`). Importing this package
imports nothing; its modules load torch."""
