"""`python -m cot_distill.train TRAIN_SECTION.yaml`: what `accelerate launch ... -m cot_distill.train` runs on
every rank."""

from cot_distill.train.run import main

main()
