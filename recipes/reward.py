"""Reward model with the Llama 2 margin loss (eq. 9), margins from ratings/labels, with RegularizedRewardTrainer.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/reward.py --config recipes/configs/reward_margin.yaml
"""

from _common import RecipeArguments, load_splits, model_init_kwargs, model_path
from trl import ModelConfig, TrlParser, get_peft_config

from trl_regularizers import RegularizedRewardConfig, RegularizedRewardTrainer


def make_parser() -> TrlParser:
    return TrlParser((RecipeArguments, RegularizedRewardConfig, ModelConfig))


def main(script_args: RecipeArguments, training_args: RegularizedRewardConfig, model_args: ModelConfig):
    model_init_kwargs(training_args, model_args)
    train, test = load_splits(script_args, training_args, "rated")
    trainer = RegularizedRewardTrainer(
        model=model_path(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train,
        eval_dataset=test,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return trainer


if __name__ == "__main__":
    trainer = main(*make_parser().parse_args_and_config())
    # Every rank past save_model, then the process group destroyed: a rank that tears gloo down while another
    # still saves can abort ("terminate called without an active exception", torch 2.13).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
