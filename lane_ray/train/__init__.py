"""Pure training and evaluation functions (torch + numpy, no Ray): features of a run directory, losses live on the
model (:meth:`SequentialRecommender.loss`), epoch functions, ranking metrics under the two protocols, faithfulness."""
