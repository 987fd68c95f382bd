# top-level graph
def forward(self, runtime, input_ids: "i64[2, 8]", labels: "i64[2, 8]"):
    unit_embed = ratel.run_unit(runtime, 'embed', input_ids)  # by outline_units
    dropout: "f32[2, 8, 32]" = unit_embed[0]  # unit=embed
    unit_blocks_0 = ratel.run_unit(runtime, 'blocks.0', dropout)  # by outline_units
    add_2: "f32[2, 8, 32]" = unit_blocks_0[0]  # unit=blocks.0
    unit_blocks_1 = ratel.run_unit(runtime, 'blocks.1', add_2)  # by outline_units
    add_4: "f32[2, 8, 32]" = unit_blocks_1[0]  # unit=blocks.1
    unit_head = ratel.run_unit(runtime, 'head', add_4, labels)  # by outline_units
    linear_8: "f32[2, 8, 64]" = unit_head[0]  # unit=head
    cross_entropy_loss: "f32[]" = unit_head[1]  # unit=head
    return (cross_entropy_loss, linear_8)
