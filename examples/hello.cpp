// Minimal C++17 program for the cpp runtime: nanogrid run examples/hello.cpp --runtime cpp
#include <iostream>
#include <string_view>

int main() {
    constexpr std::string_view greeting{"Hello from NanoGrid C++"};
    std::cout << greeting << '\n';
    return 0;
}
