"""A stack of K heads with the same hidden sizes and batch size, trained as one TensorFlow program.

The heads' weights are (K, in, out) variables and every layer is one batched matmul, so a step of
K small heads costs about one step of one head. The heads stay independent: Adam is elementwise,
so one Adam over the stacked variables is K Adams once its learning rate scales each head's update;
the loss is the sum of the per-head losses (each with its own label smoothing, class weights and
L2); each head sees the batches it would see alone (head.epoch_order of its seed, gathered per head),
starts from the weights the solo Keras head would start from (built with the same seed and
copied), and stops on its own patience with its best epoch's weights kept. A stopped head's
update is masked, and the stack sheds its stopped heads (one retrace) once they are half of it.

The arithmetic is Keras's: logits cross-entropy, `sum_over_batch_size` reduction, L2 penalties
added to the loss, Adam(beta_1=0.9, beta_2=0.999, epsilon=1e-7), EarlyStopping on val_loss with
min_delta 0. With dropout 0 a stacked head matches the solo Keras fit to float rounding. Dropout
masks come from a counter-based hash of (head seed, step, layer, row, unit), so they depend on the
head alone and a rerun draws the same masks; they are not Keras's masks, so with dropout a
stacked head and a solo one are two draws of the same training.
"""

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pipeline import head

BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7  # keras.optimizers.Adam's defaults, which the solo head uses
HISTORY_KEYS = ("accuracy", "loss", "val_accuracy", "val_loss")  # Keras's History order
SHED_WHEN_STOPPED = 0.5  # rebuild the program without its stopped heads once they are this share of it


@dataclass
class StackedFit:
    """One head's result: its best epoch's weights in Keras `get_weights` order, its history, that epoch (1-based)."""

    weights: list
    history: dict
    best_epoch: int


def fit_stack(configs, X_train, y_train, X_val, y_val, n_classes, on_finished=None):
    """Train heads of one shape (hidden sizes, batch size) together; return one StackedFit per config, in order.

    `on_finished(index, fit)` hears about each head as soon as it stops, while the others train on.
    """
    with head.deterministic():
        return _fit_stack(configs, X_train, y_train, X_val, y_val, n_classes, on_finished)


def _fit_stack(configs, X_train, y_train, X_val, y_val, n_classes, on_finished):
    keys = {(tuple(c.hidden), c.batch_size) for c in configs}
    if len(keys) != 1:
        raise ValueError(f"a stack needs one hidden/batch_size shape, got {sorted(keys)}")
    X_train = np.ascontiguousarray(X_train, np.float32)
    X_val = np.ascontiguousarray(X_val, np.float32)
    data = _Data(X_train, y_train, X_val, y_val, n_classes)
    state = _State.initial(configs, X_train.shape[1], n_classes)
    results = [None] * len(configs)
    histories = [{key: [] for key in HISTORY_KEYS} for _ in configs]
    best = [np.inf] * len(configs)
    best_epoch = [0] * len(configs)
    wait = [0] * len(configs)
    program = _Program(data, state, [configs[i] for i in state.heads])
    epoch = 0
    while state.heads:
        train_logs = program.train_epoch(epoch)
        val_loss, val_accuracy = program.validate()
        improved = np.zeros(len(state.heads), bool)
        stopped = []
        for row, i in enumerate(state.heads):
            if results[i] is not None:
                continue
            for key, value in zip(HISTORY_KEYS, (train_logs[0][row], train_logs[1][row], val_accuracy[row], val_loss[row])):
                histories[i][key].append(float(value))
            wait[i] += 1  # keras.callbacks.EarlyStopping's bookkeeping, step for step
            if float(val_loss[row]) < best[i]:
                best[i], best_epoch[i], wait[i] = float(val_loss[row]), epoch, 0
                improved[row] = True
            elif wait[i] >= configs[i].patience and epoch > 0:
                stopped.append(row)
            if epoch + 1 >= configs[i].epochs and row not in stopped:
                stopped.append(row)
        program.snapshot(improved)
        for row in stopped:
            i = state.heads[row]
            results[i] = StackedFit(program.best_weights(row), histories[i], best_epoch[i] + 1)
            if on_finished is not None:
                on_finished(i, results[i])
        program.stop(stopped)
        epoch += 1
        live = [row for row, i in enumerate(state.heads) if results[i] is None]
        if len(live) <= len(state.heads) * SHED_WHEN_STOPPED or not live:
            state = program.state(live)
            program = _Program(data, state, [configs[i] for i in state.heads]) if live else None
    return results


class _Data:
    """Train and val rows resident as tensors; one-hot targets."""

    def __init__(self, X_train, y_train, X_val, y_val, n_classes):
        self.n_classes = n_classes
        self.X = tf.constant(X_train)
        self.Y = tf.one_hot(np.asarray(y_train, np.int32), n_classes, dtype=tf.float32)
        self.X_val = tf.constant(X_val)
        self.Y_val = tf.one_hot(np.asarray(y_val, np.int32), n_classes, dtype=tf.float32)
        self.class_weight = head.class_weight_table(y_train, n_classes)
        self.rows = len(X_train)


@dataclass
class _State:
    """The numbers of a stack between programs: which heads (indices into the configs), weights, Adam's state, best snapshot."""

    heads: list
    weights: list  # per Keras weight: (K, *shape) arrays
    m: list
    v: list
    best: list
    step: int

    @classmethod
    def initial(cls, configs, input_dim, n_classes):
        solo = [_initial_weights(c, input_dim, n_classes) for c in configs]
        weights = [np.stack(per_head) for per_head in zip(*solo)]
        zeros = [np.zeros_like(w) for w in weights]
        return cls(list(range(len(configs))), weights, zeros, [z.copy() for z in zeros], [w.copy() for w in weights], 0)


def _initial_weights(config, input_dim, n_classes):
    """The weights head.fit_head starts from: the same model built after the same seeding."""
    import keras

    keras.utils.set_random_seed(config.seed)
    return head.build_head(input_dim, n_classes, config, compile=False).get_weights()


class _Program:
    """The stacked variables of the live heads and the tf.functions that train and validate them."""

    def __init__(self, data, state, configs):
        self.data, self.heads = data, state.heads
        self.batch_size = configs[0].batch_size
        self.layers = len(configs[0].hidden) + 1
        self.variables = [tf.Variable(w) for w in state.weights]
        self.m = [tf.Variable(a) for a in state.m]
        self.v = [tf.Variable(a) for a in state.v]
        self.best = [tf.Variable(a) for a in state.best]
        self.step = tf.Variable(state.step, dtype=tf.int64)
        self.active = tf.Variable(np.ones(len(configs), np.float32))
        self.lr = tf.constant([c.lr for c in configs], tf.float32)
        self.l2 = tf.constant([c.l2 for c in configs], tf.float32)
        self.smoothing = tf.constant([c.label_smoothing for c in configs], tf.float32)[:, None, None]
        self.dropout = tf.constant([c.dropout for c in configs], tf.float32)[:, None, None]
        self.uses_dropout = any(c.dropout for c in configs)
        self.seeds = tf.constant([c.seed for c in configs], tf.int64)[:, None, None]
        self.class_weights = tf.constant(
            np.stack(
                [self.data.class_weight if c.class_weight == "balanced" else np.ones(data.n_classes, np.float32) for c in configs]
            )
        )
        # Functions of this program alone (not methods, which TensorFlow would count as one function retraced per program)
        train_epoch = tf.function(lambda order: self._train_epoch(order))
        validate = tf.function(lambda: self._validate())
        snapshot = tf.function(lambda improved: self._snapshot(improved))
        self.train_epoch = lambda epoch: [t.numpy() for t in train_epoch(tf.constant(epoch, tf.int64))]
        self.validate = lambda: [t.numpy() for t in validate()]
        self.snapshot = lambda improved: snapshot(tf.constant(improved))

    def _forward(self, x, training, step=None):
        """Logits (K, rows, classes) of x: (K, rows, in), or (rows, in) for every head."""
        h = x
        for layer in range(self.layers):
            kernel, bias = self.variables[2 * layer], self.variables[2 * layer + 1]
            h = (tf.matmul(h, kernel) if h.shape.rank == 3 else tf.einsum("ni,kio->kno", h, kernel)) + bias[:, None, :]
            if layer < self.layers - 1:
                h = tf.nn.relu(h)
                if training and self.uses_dropout:
                    keep = _uniform(self.seeds, step, layer, tf.shape(h)) >= self.dropout
                    h = tf.where(keep, h / (1 - self.dropout), 0.0)
        return h

    def _penalty(self):
        """Keras's L2 regularizer on every kernel, per head."""
        return self.l2 * tf.add_n([tf.reduce_sum(tf.square(k), axis=[1, 2]) for k in self.variables[0::2]])

    def _losses(self, logits, y, sample_weight):
        smoothed = y * (1.0 - self.smoothing) + self.smoothing / self.data.n_classes
        cross_entropy = tf.nn.softmax_cross_entropy_with_logits(labels=smoothed, logits=logits)  # (K, rows)
        rows = tf.cast(tf.shape(y)[1], tf.float32)
        return tf.reduce_sum(cross_entropy * sample_weight, axis=1) / rows + self._penalty()

    def _train_step(self, index):
        """One Adam step of every head on its own batch: index (K, rows) into the train rows. Returns (loss, weighted hits)."""
        x, y = tf.gather(self.data.X, index), tf.gather(self.data.Y, index)
        sample_weight = tf.reduce_sum(y * self.class_weights[:, None, :], axis=2)
        with tf.GradientTape() as tape:
            logits = self._forward(x, True, self.step)
            losses = self._losses(logits, y, sample_weight)
            total = tf.reduce_sum(losses)
        gradients = tape.gradient(total, self.variables)
        self.step.assign_add(1)
        t = tf.cast(self.step, tf.float32)
        alpha = (
            self.lr * tf.sqrt(1 - tf.pow(tf.constant(BETA_2, tf.float32), t)) / (1 - tf.pow(tf.constant(BETA_1, tf.float32), t))
        )
        for variable, m, v, gradient in zip(self.variables, self.m, self.v, gradients):
            m.assign_add((gradient - m) * (1 - BETA_1))
            v.assign_add((tf.square(gradient) - v) * (1 - BETA_2))
            scale = tf.reshape(alpha, [-1] + [1] * (variable.shape.rank - 1))
            live = tf.reshape(self.active, scale.shape)
            variable.assign_sub(live * ((m * scale) / (tf.sqrt(v) + EPSILON)))
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=2), tf.argmax(y, axis=2)), tf.float32)
        return losses, tf.reduce_sum(hits, axis=1)

    def _train_epoch(self, epoch):
        """Every step of one epoch in one call: Keras's epoch-mean loss and accuracy (not class-weighted) per head."""
        rows, batch = self.data.rows, self.batch_size
        order = head.epoch_order(self.seeds[:, 0, 0], epoch, rows)  # each head's own order
        full = rows // batch
        heads = tf.shape(order)[0]
        loss_sum, hits = tf.zeros([heads]), tf.zeros([heads])
        for step in tf.range(full):
            losses, step_hits = self._train_step(order[:, step * batch : (step + 1) * batch])
            loss_sum, hits = loss_sum + losses * batch, hits + step_hits
        if rows % batch:
            losses, step_hits = self._train_step(order[:, full * batch :])
            loss_sum, hits = loss_sum + losses * (rows % batch), hits + step_hits
        return hits / rows, loss_sum / rows

    def _validate(self):
        logits = self._forward(self.data.X_val, False)
        y = tf.broadcast_to(self.data.Y_val, tf.concat([[len(self.heads)], tf.shape(self.data.Y_val)], 0))
        losses = self._losses(logits, y, tf.ones(tf.shape(y)[:2]))
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=2), tf.argmax(y, axis=2)), tf.float32)
        return losses, tf.reduce_mean(hits, axis=1)

    def _snapshot(self, improved):
        for variable, best in zip(self.variables, self.best):
            best.assign(tf.where(tf.reshape(improved, [-1] + [1] * (variable.shape.rank - 1)), variable, best))

    def best_weights(self, row):
        return [best[row].numpy() for best in self.best]

    def stop(self, rows):
        if rows:
            active = self.active.numpy()
            active[rows] = 0
            self.active.assign(active)

    def state(self, rows):
        """The _State of the heads at `rows`, to carry on in a smaller program."""
        take = lambda variables: [v.numpy()[rows] for v in variables]  # noqa: E731
        return _State(
            [self.heads[r] for r in rows],
            take(self.variables),
            take(self.m),
            take(self.v),
            take(self.best),
            int(self.step.numpy()),
        )


def _uniform(seeds, step, layer, shape):
    """Uniform [0, 1) numbers of `shape` (K, rows, units) from a hash of (head seed, step, layer, row, unit)."""
    rows = tf.range(shape[1], dtype=tf.int64)[None, :, None]
    units = tf.range(shape[2], dtype=tf.int64)[None, None, :]
    return tf.cast(
        tf.bitwise.right_shift(head.hash32(seeds, step, layer, rows, units), tf.constant(8, tf.int64)), tf.float32
    ) / float(1 << 24)
