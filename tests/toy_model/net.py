"""The toy network: 2-D point -> class logits, one small hidden layer."""
import paddle


class BlobClassifier(paddle.nn.Layer):
    def __init__(self, hidden_size, num_classes, dropout):
        super().__init__()
        self.hidden = paddle.nn.Linear(2, hidden_size)
        # Dropout makes training consume random numbers, so the tests of
        # seeding and resume determinism test something real.
        self.dropout = paddle.nn.Dropout(dropout)
        self.output = paddle.nn.Linear(hidden_size, num_classes)

    def forward(self, points):
        hidden = self.dropout(paddle.nn.functional.relu(self.hidden(points)))
        return self.output(hidden)
