"""The compiler's analysis room: what a pattern is, exactly, before any cost or code: its expressions evaluated
(``evaluate``) and bounded over boxes (``intervals``), its tiles classified (``tiles``, ``schedule``), its route's key
blocks, its weights, its receptive field, what a call's tiles and keywords mean."""
