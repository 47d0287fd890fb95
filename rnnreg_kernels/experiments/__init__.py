"""The paper-facing runs behind ``python -m rnnreg_kernels demo`` and ``... experiment``.

* :mod:`.demo`: K seeds of a plain and a norm-stabilized IRNN on the adding problem, run far
  past their training length (Krueger & Memisevic's claim that the stabilizer keeps IRNN
  activations bounded outside the training horizon).
* :mod:`.charlm`: the paper's character-level language-model table (tanh, relu/IRNN and TRec
  RNNs with beta = 0 and 500, LSTM with the norm-stabilizer) on a corpus every Python has.
* :mod:`.readme`: writes the README's demo and charlm sections from the committed JSON.
* :mod:`.common`: argument types, progress bars, the worker pool, environment and JSON helpers.
"""
