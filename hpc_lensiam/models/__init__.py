"""The SimSiam model: ResNet backbone, projector, predictor, loss."""
